"""specstream's web app: `python app.py` serves it on GRADIO_SERVER_NAME:GRADIO_SERVER_PORT (Gradio reads
both; default 127.0.0.1:7860). SPECSTREAM_MODEL / SPECSTREAM_ADAPTER / SPECSTREAM_DEVICE / SPECSTREAM_DTYPE
choose the model (see specstream/ui/service.py); the page itself is specstream/ui/app.py."""

from specstream.ui.app import build_demo


def gpu_decorator():
    """On a ZeroGPU Space the `spaces` package lends a GPU to decorated functions; elsewhere it is absent."""
    try:
        import spaces
    except ImportError:
        return None
    return spaces.GPU


if __name__ == "__main__":
    build_demo(gpu_decorator=gpu_decorator()).launch()
