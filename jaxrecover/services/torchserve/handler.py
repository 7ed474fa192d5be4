"""TorchServe handler for a jaxrecover model's PyTorch twin: TorchServe's own VisionHandler IG call, verbatim.

Packed into the ``.mar`` by :func:`jaxrecover.services.torchserve.build_archive` (it imports only torch,
captum and ts, which the TorchServe worker has). ``VisionHandler`` itself imports torchvision, whose PyPI
build does not load beside the CPU torch used here, so this subclasses ``BaseHandler`` and keeps
``VisionHandler.initialize``'s ``IntegratedGradients(self.model)`` and ``get_insights``'s
``self.ig.attribute(tensor_data, target=target, n_steps=15).tolist()`` unchanged: Captum's default rule
(gausslegendre), a FIXED 15 steps, the input's dtype (float32), the zero baseline.

Requests: a JSON body ``{"data": nested list (C, H, W), "target": t}``. As in ``BaseHandler.explain_handle``
the target is read from the FIRST row of a batch only. ``serving.json`` (an extra file of the archive) says
what ``/predictions`` answers: ``{"topk": null}`` raw logits (``BaseHandler``), ``{"topk": 5}`` the top-5
softmax probabilities as ``{class: probability}`` (``ImageClassifier``), ``{"topk": 0}`` the predicted label
only, and the input shape.
"""

import json
import os

import torch
import torch.nn.functional as F
from captum.attr import IntegratedGradients
from ts.torch_handler.base_handler import BaseHandler


class JaxrecoverIGHandler(BaseHandler):
    def initialize(self, context):
        super().initialize(context)
        self.ig = IntegratedGradients(self.model)  # VisionHandler.initialize
        with open(os.path.join(context.system_properties.get("model_dir"), "serving.json")) as f:
            cfg = json.load(f)
        self.topk = cfg.get("topk")
        self.input_shape = tuple(cfg["input_shape"])

    @staticmethod
    def _body(row):
        body = row.get("data") or row.get("body")
        if isinstance(body, (bytes, bytearray)):
            body = json.loads(body.decode("utf-8"))
        return body

    def preprocess(self, data):
        rows = []
        for row in data:
            body = self._body(row)
            values = body.get("data") if isinstance(body, dict) else body
            rows.append(torch.tensor(values, dtype=torch.float32).reshape(self.input_shape))
        return torch.stack(rows).to(self.device)

    def explain_handle(self, data_preprocess, raw_data):
        body = self._body(raw_data[0])  # BaseHandler.explain_handle: the first row's target for the whole batch
        target = int(body.get("target") or 0) if isinstance(body, dict) else 0
        return self.get_insights(data_preprocess, None, target)

    def get_insights(self, tensor_data, _, target=0):
        return self.ig.attribute(tensor_data, target=target, n_steps=15).tolist()  # VisionHandler.get_insights

    def postprocess(self, data):
        if self.topk is None:
            return data.tolist()
        if self.topk == 0:  # a label-only endpoint
            return data.argmax(dim=1).tolist()
        ps = F.softmax(data, dim=1)  # ImageClassifier.postprocess (no index_to_name: classes as strings)
        probs, classes = torch.topk(ps, self.topk, dim=1)
        return [{str(c): p for c, p in zip(cs, pr)} for cs, pr in zip(classes.tolist(), probs.tolist())]
