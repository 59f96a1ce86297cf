# A small convolutional network for the 8x8 digits images, given as (N, 1, 8, 8) arrays: two 3x3
# convolutions with 2x2 max pooling, then 10 logits. pytensor-ml's layers are channels-last, so the
# input is transposed to (N, 8, 8, 1) first.
from pytensor_ml.activations import ReLU
from pytensor_ml.layers import Conv2D, Flatten, Input, Linear, MaxPool2D, Sequential

LOSS = "cross_entropy"


def build(hyperparameters):
    channels = int(hyperparameters.get("channels", 8))
    n_classes = int(hyperparameters.get("n_classes", 10))
    X = Input("X", shape=(None, 1, 8, 8))
    features = Sequential(
        Conv2D("conv1", in_channels=1, out_channels=channels, kernel_size=3, padding="same"),
        ReLU(),
        MaxPool2D(kernel_size=2),
        Conv2D("conv2", in_channels=channels, out_channels=2 * channels, kernel_size=3, padding="same"),
        ReLU(),
        MaxPool2D(kernel_size=2),
    )(X.dimshuffle(0, 2, 3, 1))
    logits = Linear("logits", n_in=2 * channels * 2 * 2, n_out=n_classes)(Flatten(features))
    return X, logits
