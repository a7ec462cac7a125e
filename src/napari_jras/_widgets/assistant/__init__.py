"""J-RAS assistant dock: segment, see why (exemplars), correct, accept, fine-tune, roll back.

:class:`~.dock.AssistantWidget` composes one panel per step (the napari command
``napari-jras.assistant`` points here):

* :mod:`.segment`: image, model, scope, device, Segment, the status line;
* :mod:`.boxes`: start without a model from boxes (LiteMedSAM);
* :mod:`.exemplars`: the retrieved exemplars of the slice on screen;
* :mod:`.correct`: accept, propagate, export;
* :mod:`.learn`: fine-tune in the background, roll back;
* :mod:`.bank`: the model and bank summary, add a labelled folder.

:mod:`.state` tracks the segmented images' labels layers and drafts; the Qt-free logic lives in
:mod:`napari_jras._widgets.edits` and :mod:`napari_jras._widgets.jobs`.
"""

from .dock import ASSISTANT_NAME, SHORTCUTS, AssistantWidget, assistant_for

__all__ = ["ASSISTANT_NAME", "SHORTCUTS", "AssistantWidget", "assistant_for"]
