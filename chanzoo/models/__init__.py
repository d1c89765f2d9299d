"""chanzoo's model families; importing this registers each of them with timm."""
from chanzoo.factory import register_attn_slot
from chanzoo.models import small_cnn  # noqa: F401
from chanzoo.models import channelvit  # noqa: F401
from chanzoo.models import rgt  # noqa: F401
from chanzoo.models import histoformer  # noqa: F401
from chanzoo.models import mambamixer  # noqa: F401

register_attn_slot("small_cnn", lambda factory: {"attn_layer": factory})
register_attn_slot("mambamixer", lambda factory: {"attn_layer": factory})
