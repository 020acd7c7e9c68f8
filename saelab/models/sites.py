"""Site names and the per-family table that maps them onto Hugging Face modules.

A site is where an activation is read or written. Canonical sites are
``KIND.LAYER`` (``resid_post.12``); TransformerLens names
(``blocks.12.hook_resid_post``) and raw module paths with a direction
(``model.layers.12.mlp:out``, ``model.layers.3.self_attn.o_proj:in``) are
accepted too, and globs expand (``resid_post.*``, ``*.12``, ``attn_z.1*``,
``model.layers.*.mlp:out``):

    arch = describe(model)
    resolve_sites(arch, "resid_post.*,attn_z.0")   # -> [Site(...), ...] in depth order
    site_width(arch, Site("attn_z", 0))            # n_heads * head_dim

Within a block the depth order is
``resid_pre < attn_z < attn_out < resid_mid < mlp_in < mlp_out < resid_post``.

Every kind is read at a *tap*: the input or output of one module inside the
block (see `FAMILIES`). ``resid_mid`` is never a module output (the residual
add is inline Python), so it is tapped as the input of the norm that feeds the
MLP; `saelab.models.hooks` knows that writing there alone would not reach the
residual stream and carries the change on itself.

GPT-NeoX with ``use_parallel_residual`` (every Pythia model) computes attention
and MLP from the same ``resid_pre`` and never forms a mid-block residual. We
still define ``resid_mid = resid_pre + attn_out`` so that
``resid_post = resid_mid + mlp_out`` holds in every family; the MLP does not
read it, so patching it changes only what the block outputs (hooks.py carries
the change on attn_out).
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from functools import total_ordering

from torch import nn

from saelab.errors import SiteError

KINDS = ("resid_pre", "attn_z", "attn_out", "resid_mid", "mlp_in", "mlp_out", "resid_post")
_RANK = {kind: i for i, kind in enumerate(KINDS)}
RAW = "raw"  # kind of a site given as a module path
DIRECTIONS = ("in", "out")

# TransformerLens hook name (after "blocks.L.") for each kind.
_TL_SUFFIX = {
    "resid_pre": "hook_resid_pre",
    "resid_mid": "hook_resid_mid",
    "resid_post": "hook_resid_post",
    "attn_z": "attn.hook_z",
    "attn_out": "hook_attn_out",
    "mlp_in": "ln2.hook_normalized",
    "mlp_out": "hook_mlp_out",
}
_KIND_OF_TL = {suffix: kind for kind, suffix in _TL_SUFFIX.items()}
_TL_RE = re.compile(r"blocks\.([^.]+)\.(.+)")


@total_ordering
@dataclass(frozen=True)
class Site:
    """One site: a canonical ``KIND.LAYER`` or a raw module path (kind ``"raw"``).

    Raw sites keep their module path and direction; their layer is the block
    they sit in, -1 before the first block and n_layers after the last.
    """

    kind: str
    layer: int
    path: str = ""
    direction: str = ""

    @property
    def name(self) -> str:
        if self.kind == RAW:
            return f"{self.path}:{self.direction}"
        return f"{self.kind}.{self.layer}"

    @property
    def tl_name(self) -> str | None:
        """The TransformerLens hook name, or None for raw module sites."""
        if self.kind == RAW:
            return None
        return f"blocks.{self.layer}.{_TL_SUFFIX[self.kind]}"

    @property
    def sort_key(self) -> tuple[int, int, str, str]:
        # Raw sites have no known place inside a block; they go after its canonical sites.
        return (self.layer, _RANK.get(self.kind, len(KINDS)), self.path, self.direction)

    def __lt__(self, other: Site) -> bool:
        return self.sort_key < other.sort_key

    def __str__(self) -> str:
        return self.name

    @classmethod
    def parse(cls, text: str) -> Site:
        """A canonical or TransformerLens name without globs; no range check (see `resolve_sites`)."""
        kind, layer = _split_name(text.strip())
        if kind not in _RANK or not re.fullmatch(r"\d+", layer):
            raise SiteError(f"{text!r} is not a site name like 'resid_post.3' or "
                            f"'blocks.3.hook_resid_post'; kinds: {', '.join(KINDS)}.")
        return cls(kind, int(layer))


@dataclass(frozen=True)
class Tap:
    """Where a kind is read: the input or output of a module in the block ("" = the block)."""

    module: str
    direction: str


@dataclass(frozen=True)
class Family:
    """How the kinds map onto one family's modules. A tap of None is computed (parallel resid_mid)."""

    name: str
    model_types: tuple[str, ...]
    taps: Mapping[str, Tap | None]


def _family(name: str, model_types: tuple[str, ...], **taps: Tap | None) -> Family:
    block = {"resid_pre": Tap("", "in"), "resid_post": Tap("", "out")}
    return Family(name, model_types, {**block, **taps})


FAMILIES: tuple[Family, ...] = (
    _family("llama", ("llama",),
            attn_z=Tap("self_attn.o_proj", "in"), attn_out=Tap("self_attn.o_proj", "out"),
            resid_mid=Tap("post_attention_layernorm", "in"),
            mlp_in=Tap("mlp", "in"), mlp_out=Tap("mlp", "out")),
    _family("qwen2", ("qwen2",),
            attn_z=Tap("self_attn.o_proj", "in"), attn_out=Tap("self_attn.o_proj", "out"),
            resid_mid=Tap("post_attention_layernorm", "in"),
            mlp_in=Tap("mlp", "in"), mlp_out=Tap("mlp", "out")),
    # Gemma normalizes each sublayer's output before the residual add.
    _family("gemma2", ("gemma2",),
            attn_z=Tap("self_attn.o_proj", "in"), attn_out=Tap("post_attention_layernorm", "out"),
            resid_mid=Tap("pre_feedforward_layernorm", "in"),
            mlp_in=Tap("mlp", "in"), mlp_out=Tap("post_feedforward_layernorm", "out")),
    _family("gemma3", ("gemma3_text",),
            attn_z=Tap("self_attn.o_proj", "in"), attn_out=Tap("post_attention_layernorm", "out"),
            resid_mid=Tap("pre_feedforward_layernorm", "in"),
            mlp_in=Tap("mlp", "in"), mlp_out=Tap("post_feedforward_layernorm", "out")),
    # GPT-2's attention module returns (output, weights); its output already went through resid_dropout.
    _family("gpt2", ("gpt2",),
            attn_z=Tap("attn.c_proj", "in"), attn_out=Tap("attn", "out"),
            resid_mid=Tap("ln_2", "in"), mlp_in=Tap("mlp", "in"), mlp_out=Tap("mlp", "out")),
    # The dropout modules' outputs are exactly the terms added to the residual stream.
    _family("gpt_neox", ("gpt_neox",),
            attn_z=Tap("attention.dense", "in"), attn_out=Tap("post_attention_dropout", "out"),
            resid_mid=Tap("post_attention_layernorm", "in"),
            mlp_in=Tap("mlp", "in"), mlp_out=Tap("post_mlp_dropout", "out")),
)
_BY_MODEL_TYPE = {t: fam for fam in FAMILIES for t in fam.model_types}
# Families whose norms are LayerNorms: TransformerLens's ln2.hook_normalized is their MLP's
# input; on RMSNorm families TransformerLens reads it before the norm's weight (no site holds that).
LAYERNORM_FAMILIES = ("gpt2", "gpt_neox")


@dataclass(frozen=True)
class Architecture:
    """What saelab needs to know about a model to name, hook and size its sites."""

    family: str
    n_layers: int
    d_model: int
    d_attn_z: int  # n_heads * head_dim, the width of attn_z
    d_mlp: int
    layers_path: str  # path of the block list, e.g. "model.layers"
    taps: Mapping[str, Tap | None] = field(compare=False, repr=False)
    parallel_residual: bool = False
    # module path -> (input width, output width), None where unknown; for raw sites.
    modules: Mapping[str, tuple[int | None, int | None]] = field(
        default_factory=dict, compare=False, repr=False)

    @property
    def base_path(self) -> str:
        """Path of the module that owns the block list and sees the KV cache ("" = the model)."""
        return self.layers_path.rpartition(".")[0]

    def tap(self, site: Site) -> tuple[str, str] | None:
        """(absolute module path, direction) where `site` is read; None if it is computed."""
        if site.kind == RAW:
            return site.path, site.direction
        tap = self.taps[site.kind]
        if tap is None:
            return None
        block = f"{self.layers_path}.{site.layer}"
        return (f"{block}.{tap.module}" if tap.module else block), tap.direction


def describe(model: nn.Module) -> Architecture:
    """Recognize a supported causal LM (or its base model) and measure it."""
    config = getattr(model, "config", None)
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    model_type = getattr(text_config, "model_type", None)
    family = _BY_MODEL_TYPE.get(model_type)
    supported = ", ".join(f"{f.name} ({'/'.join(f.model_types)})" for f in FAMILIES)
    if family is None:
        raise SiteError(
            f"{type(model).__name__} (model_type {model_type!r}) is not a supported family; "
            f"supported: {supported}. Raw module paths such as 'model.layers.3.mlp:out' "
            "still work with capture/patch given an Architecture; or add the family to FAMILIES.")
    n_layers = text_config.num_hidden_layers
    layers_path = _find_layers(model, n_layers, family)
    parallel = family.name == "gpt_neox" and bool(getattr(text_config, "use_parallel_residual", False))
    taps = dict(family.taps)
    if parallel:
        taps["resid_mid"] = None  # nothing holds resid_pre + attn_out; hooks compute it
    d_model = text_config.hidden_size
    d_attn_z = _widths(model.get_submodule(f"{layers_path}.0.{taps['attn_z'].module}"))[0]
    d_mlp = getattr(text_config, "intermediate_size", None) or getattr(text_config, "n_inner", None)
    modules = {name: _widths(m) for name, m in model.named_modules() if name}
    for layer in range(n_layers):  # tapped modules take their widths from the kinds they carry
        block = f"{layers_path}.{layer}"
        for kind, tap in taps.items():
            if tap is None:
                continue
            path = f"{block}.{tap.module}" if tap.module else block
            width = d_attn_z if kind == "attn_z" else d_model
            w_in, w_out = modules.get(path, (None, None))
            modules[path] = (width, w_out) if tap.direction == "in" else (w_in, width)
    return Architecture(family.name, n_layers, d_model, d_attn_z, d_mlp or 4 * d_model,
                        layers_path, taps, parallel, modules)


def _find_layers(model: nn.Module, n_layers: int, family: Family) -> str:
    """The block list, found by structure: the longest ModuleList of blocks that have our taps."""
    def has_taps(blocks: nn.ModuleList) -> bool:
        names = {n for n, _ in blocks[0].named_modules()}
        return all(t is None or t.module in names for t in family.taps.values())

    lists = [(len(m), -name.count("."), name) for name, m in model.named_modules()
             if isinstance(m, nn.ModuleList) and len(m) > 0 and has_taps(m)]
    exact = [c for c in lists if c[0] == n_layers]
    if not (exact or lists):
        raise SiteError(f"{type(model).__name__} looks like {family.name} by its config but no "
                        f"ModuleList of blocks with modules {sorted({t.module for t in family.taps.values() if t})} "
                        "was found; is it a modified architecture? Use raw module paths.")
    return max(exact or lists)[2]


def _widths(module: nn.Module) -> tuple[int | None, int | None]:
    weight = getattr(module, "weight", None)
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    if isinstance(module, nn.Embedding):
        return None, module.embedding_dim
    if type(module).__name__ == "Conv1D" and weight is not None:  # GPT-2's transposed Linear
        return weight.shape[0], weight.shape[1]
    if weight is not None and weight.dim() == 1:  # norms
        return weight.numel(), weight.numel()
    return None, None


def all_sites(arch: Architecture) -> list[Site]:
    """Every canonical site of `arch`, in depth order."""
    return [Site(kind, layer) for layer in range(arch.n_layers) for kind in KINDS]


def site_width(arch: Architecture, site: Site | str) -> int:
    """Width of the activation at `site` (last dimension)."""
    if isinstance(site, str):
        sites = resolve_sites(arch, site)
        if len(sites) != 1:
            raise SiteError(f"{site!r} names {len(sites)} sites; site_width takes one.")
        site = sites[0]
    if site.kind == "attn_z":
        return arch.d_attn_z
    if site.kind in _RANK:
        return arch.d_model
    w_in, w_out = arch.modules.get(site.path, (None, None))
    width = w_in if site.direction == "in" else w_out
    if width is None:
        raise SiteError(f"the width of {site.name} is unknown before a forward pass ({site.path} is "
                        "not a Linear, Embedding, norm or tapped module); capture it once and read "
                        "the tensor's last dimension.")
    return width


def list_sites(arch: Architecture) -> list[tuple[Site, int]]:
    """(site, width) for every canonical site, in depth order, for `saelab sites`."""
    return [(s, site_width(arch, s)) for s in all_sites(arch)]


def resolve_sites(arch: Architecture, spec: str | Site | Iterable[str | Site]) -> list[Site]:
    """Expand names, aliases, raw paths, comma lists and globs into sites sorted by depth."""
    items = [spec] if isinstance(spec, str | Site) else list(spec)
    found: set[Site] = set()
    for item in items:
        if isinstance(item, Site):
            found.add(item)
            continue
        for token in filter(None, (t.strip() for t in item.split(","))):
            found.update(_resolve_one(arch, token))
    if not found:
        raise SiteError(f"no sites given in {spec!r}; e.g. 'resid_post.{arch.n_layers - 1}'.")
    return sorted(found)


def _resolve_one(arch: Architecture, token: str) -> list[Site]:
    if ":" in token:
        return _resolve_raw(arch, token)
    kind, layer = _split_name(token)
    if token.endswith(".ln2.hook_normalized") and arch.family not in LAYERNORM_FAMILIES:
        raise SiteError(f"{token!r} is TransformerLens's MLP input before the RMSNorm weight on "
                        f"{arch.family}; no site holds it. mlp_in.L is the MLP's input (after the weight).")
    is_glob = any(c in token for c in "*?[")
    if not is_glob:
        return [_checked(arch, token, kind, layer)]
    pattern = f"{kind}.{layer}"
    matches = [s for s in all_sites(arch) if fnmatch.fnmatchcase(s.name, pattern)]
    if not matches:
        raise SiteError(f"{token!r} matches no site of {arch.family} ({_valid(arch)}).")
    return matches


def _split_name(token: str) -> tuple[str, str]:
    """("kind", "layer text") from a canonical or TransformerLens name (globs kept)."""
    tl = _TL_RE.fullmatch(token)
    if tl:
        layer, suffix = tl.groups()
        if suffix not in _KIND_OF_TL:
            raise SiteError(f"unknown TransformerLens hook {token!r}; known: "
                            f"{', '.join(f'blocks.L.{s}' for s in _KIND_OF_TL)}.")
        return _KIND_OF_TL[suffix], layer
    kind, dot, layer = token.rpartition(".")
    if not dot:
        raise SiteError(f"{token!r} is not a site: write KIND.LAYER (e.g. '{token}.0' or "
                        f"'{token}.*'), a TransformerLens name or a module path 'path:in|out'.")
    return kind, layer


def _checked(arch: Architecture, token: str, kind: str, layer: str) -> Site:
    if kind not in _RANK:
        raise SiteError(f"unknown site kind {kind!r} in {token!r}; {_valid(arch)}.")
    try:
        index = int(layer)
    except ValueError:
        raise SiteError(f"layer {layer!r} in {token!r} is not an integer; {_valid(arch)}.") from None
    if not -arch.n_layers <= index < arch.n_layers:
        raise SiteError(f"layer {index} in {token!r} is out of range; {_valid(arch)}.")
    return Site(kind, index % arch.n_layers)  # negative layers count from the end


def _valid(arch: Architecture) -> str:
    return (f"valid kinds: {', '.join(KINDS)}; layers 0..{arch.n_layers - 1} "
            f"({arch.family}, {arch.n_layers} layers), e.g. 'resid_post.{arch.n_layers - 1}', "
            "'resid_post.*', '*.0'")


def _resolve_raw(arch: Architecture, token: str) -> list[Site]:
    path, _, direction = token.rpartition(":")
    if direction not in DIRECTIONS:
        raise SiteError(f"module site {token!r} must end in ':in' or ':out' (input or output of "
                        f"the module), e.g. '{arch.layers_path}.0.mlp:out'.")
    paths = [p for p in arch.modules if fnmatch.fnmatchcase(p, path)]
    if not paths and arch.base_path:  # relative to the base model, as sparsify names hookpoints
        paths = [p for p in arch.modules if fnmatch.fnmatchcase(p, f"{arch.base_path}.{path}")]
    if not paths:
        near = sorted(p for p in arch.modules if p.startswith(f"{arch.layers_path}.0."))[:12]
        raise SiteError(f"no module {path!r} in this {arch.family} model; modules of block 0 "
                        f"include: {', '.join(near)}. Module paths start from the model given to "
                        "describe().")
    return [Site(RAW, _layer_of(arch, p), p, direction) for p in paths]


def _layer_of(arch: Architecture, path: str) -> int:
    prefix = f"{arch.layers_path}."
    if path.startswith(prefix):
        return int(path[len(prefix):].split(".")[0])
    # Outside the blocks: before them if registered before them (embeddings), else after.
    order = list(arch.modules)
    before = path in order and order.index(path) < order.index(f"{prefix}0")
    return -1 if before else arch.n_layers
