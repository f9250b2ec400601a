"""``make demo``: the main job end to end, with a short human report.

It grows with the project: for now only the foundation exists, and the demo
says so rather than pretending.
"""

from __future__ import annotations

import subprocess
import sys


def main() -> int:
    print("quiesce demo")
    for module in ("agent", "imagetools", "hostclient"):
        out = subprocess.run([sys.executable, "-m", module, "--version"],
                             capture_output=True, text=True)
        print(f"  {module:<11} {out.stdout.strip() or out.stderr.strip()}")
    print("not there yet: the guest agent, the image engine and the backup command;"
          " the demo will boot a guest and back it up once they land.")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
