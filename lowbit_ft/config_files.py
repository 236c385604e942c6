"""Config files read strictly: a key given twice is an error naming both lines, aliases are refused before they
expand, and a config is at most MAX_CONFIG_CHARS long.

YAML itself keeps the last of two equal keys, so a recipe with two `model:` sections (or `r:` twice) silently
trains with whichever came last; an alias (`*name`) repeated inside anchors that repeat others grows
exponentially as it expands (a few hundred bytes reach gigabytes). `install()` makes this the YAML loader of every
command's `--config` and of YAML values on the command line.
"""

from __future__ import annotations

import os

import yaml

#: a config (or a YAML value on the command line) longer than this is refused before it is parsed
MAX_CONFIG_CHARS = 1_000_000


class ConfigFileError(yaml.YAMLError):
    """A config that parses but is refused; its message is the one line the user sees."""


def _strict(base: type) -> type:
    """`base` (jsonargparse's YAML loader: its number rules) on the pure-Python composer, which can stop aliases,
    refusing duplicate keys."""

    class StrictLoader(yaml.SafeLoader):
        yaml_implicit_resolvers = base.yaml_implicit_resolvers

        def compose_node(self, parent, index):
            if self.check_event(yaml.AliasEvent):
                event = self.peek_event()
                raise ConfigFileError(f"line {event.start_mark.line + 1}: YAML aliases (*{event.anchor}) are not "
                                      "accepted in configs; write the value out")
            return super().compose_node(parent, index)

        def construct_mapping(self, node, deep=False):
            seen: dict[object, int] = {}
            for key_node, _ in node.value:
                key = self.construct_object(key_node, deep=True)
                line = key_node.start_mark.line + 1
                if isinstance(key, str | int | float | bool) and key in seen:
                    raise ConfigFileError(f"key {key!r} is given twice, on lines {seen[key]} and {line}; YAML would "
                                          "keep only the second: remove one")
                seen.setdefault(key, line)
            return super().construct_mapping(node, deep)

    return StrictLoader


def strict_yaml_load(stream: str):
    """jsonargparse's YAML loading (its loader class is the strict one once `install` ran), size-checked first."""
    from jsonargparse._loaders_dumpers import yaml_load

    if len(stream) > MAX_CONFIG_CHARS:
        raise ConfigFileError(f"the config is {len(stream):,} characters long, more than {MAX_CONFIG_CHARS:,}; "
                              "a config this large is refused")
    return yaml_load(stream)


def install() -> None:
    """Make jsonargparse load YAML strictly: every `--config` and every YAML value on the command line."""
    import jsonargparse._loaders_dumpers as loaders
    from jsonargparse import set_loader

    base = loaders.get_yaml_default_loader()
    if not getattr(base, "strict", False):
        loaders.yaml_default_loader = type("StrictConfigLoader", (_strict(base),), {"strict": True})
    set_loader("yaml", strict_yaml_load, exceptions=(yaml.YAMLError,))


def config_problem(argv: list[str]) -> str | None:
    """What is wrong with the first `--config FILE` of a command line that the strict loader refuses (None: nothing
    found), checked before any heavy import, so a bad config costs a fraction of a second."""
    for i, arg in enumerate(argv):
        path = argv[i + 1] if arg == "--config" and i + 1 < len(argv) else arg.removeprefix("--config=") \
            if arg.startswith("--config=") else None
        if path is None or not os.path.isfile(path):
            continue
        try:
            with open(path, encoding="utf-8") as f:
                text = f.read(MAX_CONFIG_CHARS + 1)
            install()
            strict_yaml_load(text)
        except (yaml.YAMLError, UnicodeDecodeError) as err:
            return f"--config {path}: {' '.join(str(err).split())}"
    return None
