"""TensorBoard event files of scalars, written without tensorboard or tensorflow installed.

An event file is a TFRecord stream: each record is its length (uint64, little endian), the masked CRC32C of
those 8 bytes, the data, and the masked CRC32C of the data. Each record's data is a `tensorflow.Event`
protobuf; the first holds `file_version`, the others a `Summary` of scalar `simple_value`s. Only the few
protobuf fields used here are encoded, by hand:

    Event   { double wall_time = 1; int64 step = 2; string file_version = 3; Summary summary = 5; }
    Summary { repeated Value value = 1; }
    Value   { string tag = 1; float simple_value = 2; }

Each write is flushed, so TensorBoard pointed at the folder shows a run while it trains.
"""

from __future__ import annotations

import os
import socket
import struct
import time
from pathlib import Path

_CRC32C_POLY = 0x82F63B78  # Castagnoli, reflected


def _crc_table() -> list[int]:
    table = []
    for n in range(256):
        c = n
        for _ in range(8):
            c = (c >> 1) ^ _CRC32C_POLY if c & 1 else c >> 1
        table.append(c)
    return table


_TABLE = _crc_table()


def crc32c(data: bytes) -> int:
    crc = 0xFFFFFFFF
    for b in data:
        crc = _TABLE[(crc ^ b) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def masked_crc32c(data: bytes) -> int:
    # TFRecord masks the CRC so that a CRC of data that itself holds CRCs is not trivially related to them.
    crc = crc32c(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def tfrecord(data: bytes) -> bytes:
    length = struct.pack("<Q", len(data))
    return length + struct.pack("<I", masked_crc32c(length)) + data + struct.pack("<I", masked_crc32c(data))


def _varint(n: int) -> bytes:
    if n < 0:  # int64 fields encode negatives as their two's complement, ten bytes long
        n += 1 << 64
    out = bytearray()
    while True:
        byte = n & 0x7F
        n >>= 7
        if n:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _field_bytes(number: int, payload: bytes) -> bytes:
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def event(wall_time: float, step: int, *, file_version: str | None = None,
          scalars: dict[str, float] | None = None) -> bytes:
    """One serialized `Event`: the file-version header, or a summary of scalars at `step`."""
    out = _varint(1 << 3 | 1) + struct.pack("<d", wall_time) + _varint(2 << 3 | 0) + _varint(step)
    if file_version is not None:
        out += _field_bytes(3, file_version.encode())
    if scalars:
        values = b"".join(_field_bytes(1, _field_bytes(1, tag.encode()) + _varint(2 << 3 | 5)
                                       + struct.pack("<f", float(value)))
                          for tag, value in scalars.items())
        out += _field_bytes(5, values)
    return out


class EventFileWriter:
    """Scalars into `logdir/events.out.tfevents.<time>.<host>.<pid>.0`, the name TensorBoard looks for."""

    def __init__(self, logdir: Path) -> None:
        logdir.mkdir(parents=True, exist_ok=True)
        now = time.time()
        self.path = logdir / f"events.out.tfevents.{int(now)}.{socket.gethostname()}.{os.getpid()}.0"
        self._file = open(self.path, "ab")
        self._write(event(now, 0, file_version="brain.Event:2"))

    def add_scalars(self, step: int, scalars: dict[str, float], wall_time: float | None = None) -> None:
        self._write(event(time.time() if wall_time is None else wall_time, step, scalars=scalars))

    def _write(self, data: bytes) -> None:
        self._file.write(tfrecord(data))
        self._file.flush()

    def close(self) -> None:
        if not self._file.closed:
            self._file.close()
