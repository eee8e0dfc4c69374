"""The file formats a DAW reads the tempo from: the RIFF `acid` chunk and a standard MIDI file.

Both are written here byte by byte (no dependency) and read back by the parsers below, which
the tests and `stage-stack export` use to check what was written.

ACID chunk (Sonic Foundry's loop metadata; Ableton Live, FL Studio and Reaper read its tempo),
24 bytes of payload, little-endian:

    uint32 flags        0x01 one-shot, 0x02 root note set, 0x04 stretch, 0x08 disk-based
    uint16 root note    MIDI note (60 = C4); meaningful only with flag 0x02
    uint16 reserved     0x8000, as Acid writes it
    float32 reserved    0.0
    uint32 beats        length of the file in beats
    uint16 denominator  of the time signature (4)
    uint16 numerator    of the time signature (4)
    float32 tempo       beats per minute

Standard MIDI file: format 0, one track, 480 ticks per quarter note; a track name, the tempo
(FF 51, microseconds per quarter note), the time signature (FF 58) and, when asked, one note
per beat on the GM percussion channel (channel 10): a high wood block (76) on each downbeat,
a low wood block (77) on the other beats, 1/16 note long.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path

ACID_ID = b"acid"
ACID_STRETCH = 0x04
PPQ = 480  # ticks per quarter note
DOWNBEAT_NOTE, BEAT_NOTE = 76, 77  # GM percussion: hi / low wood block
PERCUSSION_CHANNEL = 9  # channel 10, counted from 0


# -- RIFF / ACID ------------------------------------------------------------------------------

@dataclass(frozen=True)
class AcidInfo:
    tempo: float
    beats: int
    numerator: int = 4
    denominator: int = 4
    flags: int = ACID_STRETCH
    root_note: int = 60


def acid_payload(info: AcidInfo) -> bytes:
    return struct.pack("<IHHfIHHf", info.flags, info.root_note, 0x8000, 0.0, info.beats, info.denominator,
                       info.numerator, float(info.tempo))


def riff_chunks(data: bytes) -> list[tuple[bytes, bytes]]:
    """[(chunk id, payload)] of a RIFF/WAVE file; raises ValueError on anything else."""
    if len(data) < 12 or data[:4] != b"RIFF" or data[8:12] != b"WAVE":
        raise ValueError("not a RIFF/WAVE file")
    chunks, pos = [], 12
    while pos + 8 <= len(data):
        cid, size = data[pos:pos + 4], struct.unpack("<I", data[pos + 4:pos + 8])[0]
        payload = data[pos + 8:pos + 8 + size]
        if len(payload) != size:
            raise ValueError(f"chunk {cid!r} at byte {pos} runs past the end of the file")
        chunks.append((cid, payload))
        pos += 8 + size + (size & 1)  # chunks are padded to an even length
    return chunks


def write_riff(chunks: list[tuple[bytes, bytes]]) -> bytes:
    body = b"WAVE"
    for cid, payload in chunks:
        body += cid + struct.pack("<I", len(payload)) + payload + (b"\0" if len(payload) & 1 else b"")
    return b"RIFF" + struct.pack("<I", len(body)) + body


def with_acid_chunk(wav: bytes, info: AcidInfo) -> bytes:
    """A WAV file's bytes with an `acid` chunk (replacing any) placed before its `data` chunk."""
    chunks = [c for c in riff_chunks(wav) if c[0] != ACID_ID]
    at = next(i for i, (cid, _) in enumerate(chunks) if cid == b"data")
    chunks.insert(at, (ACID_ID, acid_payload(info)))
    return write_riff(chunks)


def read_acid(path: str | Path) -> AcidInfo | None:
    """The `acid` chunk of a WAV file, or None."""
    for cid, payload in riff_chunks(Path(path).read_bytes()):
        if cid == ACID_ID:
            flags, root, _, _, beats, den, num, tempo = struct.unpack("<IHHfIHHf", payload[:24])
            return AcidInfo(tempo=tempo, beats=beats, numerator=num, denominator=den, flags=flags, root_note=root)
    return None


# -- standard MIDI file -----------------------------------------------------------------------

def _vlq(value: int) -> bytes:
    """A MIDI variable-length quantity: 7 bits a byte, most significant first, high bit = more."""
    out = [value & 0x7F]
    value >>= 7
    while value:
        out.append(0x80 | (value & 0x7F))
        value >>= 7
    return bytes(reversed(out))


def click_midi(bpm: float, beats: int, beats_per_bar: int = 4, name: str = "click", notes: bool = True) -> bytes:
    """A format-0 SMF holding the tempo, a 4/4 time signature and (with `notes`) the click."""
    events: list[tuple[int, bytes]] = [
        (0, b"\xff\x03" + _vlq(len(name.encode())) + name.encode()),
        (0, b"\xff\x51\x03" + round(60_000_000 / bpm).to_bytes(3, "big")),
        (0, b"\xff\x58\x04" + bytes([beats_per_bar, 2, 24, 8])),  # n/4, 24 clocks a click, 8 32nds a quarter
    ]
    if notes:
        length = PPQ // 4
        for beat in range(beats):
            note = DOWNBEAT_NOTE if beat % beats_per_bar == 0 else BEAT_NOTE
            velocity = 110 if note == DOWNBEAT_NOTE else 80
            events.append((beat * PPQ, bytes([0x90 | PERCUSSION_CHANNEL, note, velocity])))
            events.append((beat * PPQ + length, bytes([0x80 | PERCUSSION_CHANNEL, note, 0])))
    end = max([beats * PPQ] + [tick for tick, _ in events])
    events.append((end, b"\xff\x2f\x00"))
    track, now = b"", 0
    for tick, event in sorted(events, key=lambda e: e[0]):  # stable: note-offs stay before the next note-on
        track += _vlq(tick - now) + event
        now = tick
    header = b"MThd" + struct.pack(">IHHH", 6, 0, 1, PPQ)
    return header + b"MTrk" + struct.pack(">I", len(track)) + track


@dataclass(frozen=True)
class MidiFile:
    format: int
    ppq: int
    tempo_us: int | None  # microseconds per quarter note
    time_signature: tuple[int, int] | None
    notes: list[tuple[int, int, int]]  # (tick, note, velocity) of each note-on

    @property
    def bpm(self) -> float | None:
        return None if self.tempo_us is None else 60_000_000 / self.tempo_us


def read_midi(data: bytes) -> MidiFile:
    """Parse the subset of SMF that `click_midi` writes (meta, note on/off; running status too)."""
    if data[:4] != b"MThd":
        raise ValueError("not a standard MIDI file (no MThd)")
    _, fmt, ntracks, ppq = struct.unpack(">IHHH", data[4:14])
    pos, tempo, signature, notes = 14, None, None, []
    for _ in range(ntracks):
        if data[pos:pos + 4] != b"MTrk":
            raise ValueError(f"expected MTrk at byte {pos}")
        (size,) = struct.unpack(">I", data[pos + 4:pos + 8])
        track, pos = data[pos + 8:pos + 8 + size], pos + 8 + size
        i, tick, status = 0, 0, 0
        while i < len(track):
            delta = 0
            while True:
                byte = track[i]
                i += 1
                delta = (delta << 7) | (byte & 0x7F)
                if not byte & 0x80:
                    break
            tick += delta
            if track[i] & 0x80:
                status = track[i]
                i += 1
            if status == 0xFF:
                kind, length = track[i], track[i + 1]
                body = track[i + 2:i + 2 + length]
                i += 2 + length
                if kind == 0x51:
                    tempo = int.from_bytes(body, "big")
                elif kind == 0x58:
                    signature = (body[0], 2 ** body[1])
            elif status & 0xF0 in (0x80, 0x90):
                note, velocity = track[i], track[i + 1]
                i += 2
                if status & 0xF0 == 0x90 and velocity:
                    notes.append((tick, note, velocity))
            else:
                raise ValueError(f"unsupported MIDI status {status:#x}")
    return MidiFile(fmt, ppq, tempo, signature, notes)
