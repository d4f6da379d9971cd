"""POSIX semantics on inode ids: namespace, open files, dirty chunk buffers. No pyfuse3 here."""
