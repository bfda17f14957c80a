"""Views: the JSON shapes of the emulator's own (non-Google) APIs, read from and written
through the store. Surfaces render them; the store never sees JSON bodies."""
