"""Backends implement `dgemma.backend.Backend`; they are imported lazily by name (see dgemma.backend)."""
