"""secagg: federated learning with homomorphic-encryption secure aggregation.

One round, in the order the data moves (see ``secagg.rounds``): every client trains, flattens
its model, weights it by its sample count and encrypts it; the server adds the ciphertexts
without holding the secret key; every client decrypts the sum, divides by the total weight and
loads the new global model.
"""

__version__ = "0.1.0"
