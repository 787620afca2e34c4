"""Sample files from image folders: what ``onnx-rectify pairs`` builds.

- :mod:`~patcher.imagedata.preprocess`: how an image becomes the model's input (size,
  channels, scale, mean/std, layout), read from the model's ``metadata_props`` or given;
- :mod:`~patcher.imagedata.images`: the image folder (class subfolders or loose images)
  and decoding with Pillow (an optional extra, imported only when used);
- :mod:`~patcher.imagedata.trigger`: a trigger image pasted or blended at a place;
- :mod:`~patcher.imagedata.build`: the seeded, disjoint pairs/eval/attack splits and the
  npz files in the contract of :mod:`patcher.samples`.
"""
