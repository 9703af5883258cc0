"""X-ray Compton scattering imaging and absorption CT of solid-state cells."""
