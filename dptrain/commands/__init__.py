"""Commands of ``python -m dptrain`` beyond training: ``predict`` (a saved model on an
input file), ``summary`` (the model a config builds, without training) and the report that
``eval`` prints. Each module has its parser and its handler; cli.py dispatches to them."""
