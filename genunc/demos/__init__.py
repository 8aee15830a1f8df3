"""Demo jobs run by `genunc demo` / `make demo`."""
