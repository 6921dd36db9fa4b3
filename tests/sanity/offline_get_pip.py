"""Stand-in for the pip bootstrap script that ansible-test downloads.

ansible-test fetches get-pip.py from a host these machines cannot reach; this
does the same job offline: pip from the interpreter's own ensurepip, then the
requested pip version from the package index the machine is configured for.
scripts/test copies it to ~/.ansible/test/cache/get_pip_<version>.py.
"""

import ensurepip
import os
import subprocess
import sys

ensurepip.bootstrap(upgrade=True)
args = [a for a in sys.argv[1:] if a not in ("--no-setuptools", "--no-wheel")]
# ansible-test runs pip with a scrubbed environment; keep the system CA bundle.
if os.path.exists("/etc/ssl/certs/ca-certificates.crt"):
    args = ["--cert", "/etc/ssl/certs/ca-certificates.crt", *args]
sys.exit(subprocess.call([sys.executable, "-m", "pip", "install", "--quiet", *args]))
