"""Building small ONNX models in tests (IR and opset set explicitly: onnxruntime 1.31
accepts at most IR 13 / opset 26, while onnx 1.23's helpers stamp newer ones)."""
from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

IR_VERSION = 8
OPSET = 17


def value_info(name: str, shape, elem_type: int = TensorProto.FLOAT):
    return helper.make_tensor_value_info(name, elem_type, shape)


def make_model(nodes, inputs, outputs, initializers=(), opset: int = OPSET,
               ir_version: int = IR_VERSION, name: str = "test") -> onnx.ModelProto:
    """A model from nodes; ``initializers`` maps name -> numpy array (or a list of TensorProto)."""
    if isinstance(initializers, dict):
        initializers = [numpy_helper.from_array(np.asarray(v), k) for k, v in initializers.items()]
    graph = helper.make_graph(list(nodes), name, list(inputs), list(outputs), list(initializers))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = ir_version
    return model


def single_node(op_type: str, input_shapes: dict, output_names=("y",), initializers=None,
                opset: int = OPSET, **attrs) -> onnx.ModelProto:
    """One node whose inputs are graph inputs (float) and named initializers."""
    initializers = dict(initializers or {})
    inputs = [value_info(n, s) for n, s in input_shapes.items()]
    node_inputs = list(input_shapes) + list(initializers)
    node = helper.make_node(op_type, node_inputs, list(output_names), name=f"{op_type}_node",
                            **attrs)
    outputs = [helper.make_empty_tensor_value_info(n) for n in output_names]
    return make_model([node], inputs, outputs, initializers, opset=opset)
