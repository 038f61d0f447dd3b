"""Examples of user code the simulator loads by ``module:Class`` specs."""
