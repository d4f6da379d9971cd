"""Key handling and sealing: the only code in mifs that touches key material.

Pure and synchronous: no I/O beyond key files in keyring, no trio. Callers choose threads.
"""
