"""The metadata database: inodes, directory entries, wrapped keys and chunk maps (SQLCipher)."""
