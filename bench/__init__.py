"""Side-by-side benchmark of medbroker against direct sshd and OpenSSH ProxyJump (``python -m bench``)."""
