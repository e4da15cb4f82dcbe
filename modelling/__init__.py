"""The model's life cycle, in torch: the network, training, calibration, evaluation, explanations, export.

``model`` (with ``branches`` and ``config``) defines the CNN-LSTM fusion network; ``train`` fits it on the
synthetic cohort (``synth``); ``calibrate`` holds the calibration and its metrics; ``evaluate`` scores the
shipped ``weights/`` on fresh cohorts; ``explain`` attributes a score; ``export`` writes the ONNX model the
engine serves (``inference.runtime``). Each step is a command: ``python -m modelling.<step>`` or
``strokewatch model <step>``. The engine never imports this package (MODEL_CARD.md describes the model).
"""
