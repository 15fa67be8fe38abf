"""cskd.export: turn a trained student (or teacher) into a deployable model package."""
