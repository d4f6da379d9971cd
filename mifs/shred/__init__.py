"""Crypto-shredding, retention purge and undelete (service) and their control commands."""
