"""The capture daemon: binds the archive queue to the broker's exchanges and stores what arrives."""
