"""Learning across sites without moving patient data: Flower federated training and DP-SGD (Opacus).

What is learnt at the sites is the fusion model's vitals branch (the LSTM, its projection and concept head)
and its fusion head (``LogisticHead``'s weights); the image branch is the shipped 3D CNN, frozen, whose image
concepts each site computes once per patient (training a 3D CNN across sites does not fit a 2-core budget;
``simulate`` measures what the frozen CNN costs). The vitals statistics' normalisation and the head's feature
standardisation are the shipped model's, fixed, so every site standardises alike.

* ``net``: the trainable model, its exchanged weights, local training (FedProx), DP-SGD;
* ``sites``: one site's data, read through the engine's preprocessing (``inference.preprocess``);
* ``flower``: the Flower server and client (gRPC, TLS, HMAC-signed updates);
* ``simulate``: every site on one machine, central / federated / site-alone / DP compared on unseen patients;
* ``cli``: ``strokewatch federated server|client|simulate``.

Runs in its own venv (``.venv-federated``: flwr pins versions below the engine's; README "Learning across sites").
"""
