"""Whether a chat template's output is its rendering for the roles alone, with each message's content
put in verbatim.

A template passes when, read as Jinja's syntax tree, it prints `message['content']` (or
`message.content`) only as a term of a `+` / `~` concatenation that is printed as it is, and uses the
messages for nothing else but their roles (`for message in messages`, `messages[0]['role']`,
`messages|length`, `loop.*`). No branch, filter, call, test or assignment then sees a content, so
rendering a conversation gives the rendering with a marker in place of each content (done once per
sequence of roles) with the markers replaced by the contents. `Processor` then builds the text by
joining strings instead of running the template for every record, and still renders the first
conversation of each sequence of roles through the template to compare. Anything else (a `trim` or
`strip` of the content, a test on it, `messages[1:]`, `tojson`, a macro taking a message, a tag this
parser does not know) fails the check, and every conversation is rendered by the template.
"""

from __future__ import annotations

import jinja2
import jinja2.ext
from jinja2 import nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment

_MESSAGE_KEYS = ("role", "content")


def _key(node: nodes.Node) -> str | None:
    """'role' for `x['role']` or `x.role`, … ; None for any other node."""
    if isinstance(node, nodes.Getitem) and isinstance(node.arg, nodes.Const) and isinstance(node.arg.value, str):
        return node.arg.value
    if isinstance(node, nodes.Getattr):
        return node.attr
    return None


def _printed_as_is(node: nodes.Node, parents: dict) -> bool:
    """`node` is (a term of a concatenation that is) printed by `{{ }}` as it is."""
    while True:
        parent = parents.get(id(node))
        if isinstance(parent, nodes.Output):
            return True
        if isinstance(parent, nodes.Add) or (isinstance(parent, nodes.Concat) and node in parent.nodes):
            node = parent
            continue
        return False


def content_printed_verbatim(template: str | None) -> bool:
    """True when `template` renders each message's content verbatim and depends otherwise only on the roles
    (see the module's docstring); False when that is not shown."""
    if not isinstance(template, str) or not template:
        return False
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    try:
        tree = env.parse(template)
    except jinja2.TemplateError:
        return False
    parents: dict[int, nodes.Node] = {}
    every: list[nodes.Node] = []
    stack = [tree]
    while stack:
        node = stack.pop()
        every.append(node)
        for child in node.iter_child_nodes():
            parents[id(child)] = node
            stack.append(child)
    loop_vars = set()
    for node in every:
        if isinstance(node, nodes.For) and isinstance(node.iter, nodes.Name) and node.iter.name == "messages":
            if not isinstance(node.target, nodes.Name):
                return False
            loop_vars.add(node.target.name)
    targets = {id(n.target) for n in every if isinstance(n, nodes.For)}
    for node in every:
        if isinstance(node, nodes.Name):
            parent = parents.get(id(node))
            if node.ctx != "load":  # nothing may rebind the messages or a message
                if node.name == "messages" or (node.name in loop_vars and id(node) not in targets):
                    return False
                continue
            if node.name == "messages":
                if isinstance(parent, nodes.For) and parent.iter is node:
                    continue
                if isinstance(parent, nodes.Filter) and parent.name == "length" and parent.node is node:
                    continue
                if (
                    isinstance(parent, nodes.Getitem)
                    and parent.node is node
                    and isinstance(parent.arg, nodes.Const)
                    and type(parent.arg.value) is int
                    and _key(parents.get(id(parent))) in _MESSAGE_KEYS
                ):
                    continue
                return False
            if node.name in loop_vars and not (_key(parent) in _MESSAGE_KEYS and parent.node is node):
                return False
        elif (
            isinstance(node, nodes.Getattr)
            and isinstance(node.node, nodes.Name)
            and node.node.name == "loop"
            and node.attr in ("previtem", "nextitem")
        ):
            if _key(parents.get(id(node))) not in _MESSAGE_KEYS:
                return False
        if _key(node) == "content" and not _printed_as_is(node, parents):
            return False
    return True
