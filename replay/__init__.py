"""The replay tool: find slices of the archive and republish them, tagged as replays."""
