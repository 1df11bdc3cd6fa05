"""The institution process: its round logic and the loop that owns its socket and files."""
