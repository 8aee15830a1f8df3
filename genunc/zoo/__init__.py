"""The shipped reference models and what loads them: their folders (:mod:`genunc.zoo.shipped`),
architectures and data, plus toy denoisers for tests and smoke runs.  The recipes that trained
them are the lab's (:mod:`genunc.research`), which nothing here imports."""
