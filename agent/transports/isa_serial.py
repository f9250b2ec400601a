"""isa-serial: a serial line (default /dev/ttyS0), through pyserial.

The line is put in raw mode at 38400 baud (qemu-ga's settings: no echo, no
line editing, no flow control, no CR/NL translation) and used as one
permanent connection.
"""

from __future__ import annotations

import os

from agent.transports.base import Channel, ChannelError, Connection


class IsaSerialChannel(Channel):
    def __init__(self, port, path: str) -> None:
        self.path = path
        self._port = port
        self._conn = Connection(port.fileno())

    @classmethod
    def open(cls, path: str) -> "IsaSerialChannel":
        import serial  # pyserial; imported here to keep start-up fast for other methods
        try:
            port = serial.Serial(path, baudrate=38400, bytesize=serial.EIGHTBITS,
                                 parity=serial.PARITY_NONE, stopbits=serial.STOPBITS_ONE,
                                 xonxoff=False, rtscts=False, dsrdtr=False,
                                 timeout=0, write_timeout=0, exclusive=False)
        except (serial.SerialException, OSError, ValueError) as exc:
            code = getattr(exc, "errno", None)
            reason = os.strerror(code) if isinstance(code, int) and code else str(exc)
            raise ChannelError(f"error opening channel '{path}': {reason}") from None
        port.reset_input_buffer()
        return cls(port, path)

    def fileno(self) -> int:
        return self._conn.fd

    def connection(self) -> Connection:
        return self._conn

    def close(self) -> None:
        try:
            self._port.close()
        except Exception:
            pass
        self._conn.fd = -1
