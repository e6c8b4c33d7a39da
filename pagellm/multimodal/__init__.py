"""Images in prompts (issue 18 part 2): what a prompt's images become before the engine core sees them.

    media.py       an image_url (data:, file://, http(s)://) -> PIL image, under the server's media rules
    processing.py  images + prompt token ids -> placeholder tokens expanded, one MultiModalFeature per image
    inputs.py      MultiModalFeature: tensors as bytes, placeholder span, content hash (prefix-cache key)

The model runner encodes a feature's image when a step first computes its span (worker/mm_embeds.py).
"""
