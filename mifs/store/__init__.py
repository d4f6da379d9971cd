"""Object stores: where sealed objects live. Backends never see plaintext, keys, inodes or names."""
