"""The recipes that made the shipped reference models, one module per model family; each writes
a folder :mod:`genunc.zoo` loads, with ``training.json`` naming the ``genunc zoo train`` command."""
