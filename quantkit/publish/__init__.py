"""What a scored run becomes: the report and plot (``report``), model cards (``card``), Ollama
Modelfiles (``modelfile``), the hardware fit table (``hardware``), and the release itself
(``release``: the regression gate, the local artifact store, the Hub with one repo per format laid out
by ``hublayout``)."""
