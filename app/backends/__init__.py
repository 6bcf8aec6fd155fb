from .base import Backend, BackendError, BackendInfo, ReplyHandle

__all__ = ["Backend", "BackendError", "BackendInfo", "ReplyHandle"]
