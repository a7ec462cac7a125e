"""Qt widgets (thin: every computation lives in :mod:`napari_jras.core`).

* :class:`~napari_jras._widgets.assistant.AssistantWidget`: segment, exemplar gallery, accept
  corrections, autosave drafts, fine-tune, roll back (dock "J-RAS assistant"), composed of the
  small panels of :mod:`napari_jras._widgets.assistant`.
* :mod:`~napari_jras._widgets.edits` and :mod:`~napari_jras._widgets.jobs`: the assistant's
  Qt-free logic (edited slices, merging predictions with edits, drafts) and background jobs.
* :class:`~napari_jras._widgets.training.TrainingPanel`: train and evaluate a model on a labelled
  folder (dock "J-RAS training").
* :class:`~napari_jras._widgets.gallery.ExemplarGallery` and
  :class:`~napari_jras._widgets.plot.LossPlot`: building blocks of both.
"""
