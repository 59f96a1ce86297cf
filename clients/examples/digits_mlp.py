# A two-layer perceptron for the 8x8 digits images: 64 inputs, one hidden ReLU layer, 10 logits.
from pytensor_ml.activations import ReLU
from pytensor_ml.layers import Input, Linear, Sequential

LOSS = "cross_entropy"


def build(hyperparameters):
    n_inputs = int(hyperparameters.get("n_inputs", 64))
    hidden_units = int(hyperparameters.get("hidden_units", 128))
    n_classes = int(hyperparameters.get("n_classes", 10))
    X = Input("X", shape=(None, n_inputs))
    network = Sequential(
        Linear("hidden", n_in=n_inputs, n_out=hidden_units),
        ReLU(),
        Linear("logits", n_in=hidden_units, n_out=n_classes),
    )
    return X, network(X)
