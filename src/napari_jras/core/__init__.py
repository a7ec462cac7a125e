"""Qt-free compute core of napari-jras: data I/O, bank, retrieval, fusion, models, training."""
