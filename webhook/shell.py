"""A shell script's simple commands as words with their places in the text.

``shlex`` tells a script's words but not where they stand, and joining them again loses quoting
and expansions (``$MODEL`` would come back as ``'$MODEL'``). The webhook edits a server's
arguments inside ``sh -c "..."`` by cutting and inserting text at word boundaries, so it needs the
boundaries. This lexer follows POSIX shell quoting, escapes, expansions, comments and operators; a
construct it cannot place exactly (a here-document, an unterminated quote) raises
:class:`Unsupported`, and the caller denies rather than guesses.
"""

from dataclasses import dataclass
from typing import Final

_BLANKS: Final = " \t"
_OPERATOR_CHARS: Final = ";&|()"
_REDIRECT_CHARS: Final = "<>"
_GLOB_CHARS: Final = "*?["


class Unsupported(ValueError):
    """The script uses a construct that cannot be edited exactly."""


@dataclass(frozen=True)
class Word:
    """One word of a simple command.

    ``literal`` is its value after quote removal when it holds no expansion (``None`` otherwise);
    ``prefix`` is the literal text before its first expansion (all of it when there is none).
    """

    start: int
    end: int
    literal: str | None
    prefix: str


@dataclass(frozen=True)
class Command:
    """A simple command: its argument words, without operators and redirections."""

    words: tuple[Word, ...]

    def literals(self) -> list[str | None]:
        """Each word's literal value (``None`` for a word with an expansion)."""
        return [word.literal for word in self.words]


def commands(script: str) -> list[Command]:
    """Split ``script`` into simple commands; :class:`Unsupported` for what it cannot place."""
    return _Lexer(script).run()


class _Lexer:
    def __init__(self, text: str) -> None:
        self.text = text
        self.pos = 0
        self.done: list[Command] = []
        self.words: list[Word] = []
        self.redirect_target = False

    def run(self) -> list[Command]:
        text = self.text
        while self.pos < len(text):
            char = text[self.pos]
            if char in _BLANKS:
                self.pos += 1
            elif char == "\\" and text.startswith("\\\n", self.pos):
                self.pos += 2  # a line continuation joins lines; it is no separator
            elif char == "\n" or char in _OPERATOR_CHARS:
                self._end_command()
                self.pos += 1
            elif char == "#":
                end = text.find("\n", self.pos)
                self.pos = len(text) if end < 0 else end
            elif char in _REDIRECT_CHARS:
                self._redirect()
            else:
                self._word()
        if self.redirect_target:
            raise Unsupported("a redirection has no target")
        self._end_command()
        return self.done

    def _end_command(self) -> None:
        if self.redirect_target:
            raise Unsupported("a redirection has no target")
        if self.words:
            self.done.append(Command(tuple(self.words)))
        self.words = []

    def _redirect(self) -> None:
        text = self.text
        if text.startswith("<<", self.pos) and not text.startswith("<<<", self.pos):
            raise Unsupported("here-documents are not supported")
        self.pos += 1
        while self.pos < len(text) and text[self.pos] in "<>&|":
            self.pos += 1
        if text.startswith("-", self.pos) and text[self.pos - 1] == "&":
            self.pos += 1  # ``>&-`` closes a descriptor: no target follows
            return
        self.redirect_target = True

    def _word(self) -> None:
        start = self.pos
        literal: list[str] = []
        prefix: list[str] | None = None  # set when the first expansion is met
        text = self.text
        while self.pos < len(text):
            char = text[self.pos]
            if char in _BLANKS or char == "\n" or char in _OPERATOR_CHARS:
                break
            if char in _REDIRECT_CHARS:
                if "".join(literal).isdigit() and prefix is None:
                    literal.clear()  # ``2>`` names a descriptor, not a word
                    self._redirect()
                    return
                break
            if char == "\\":
                if self.pos + 1 >= len(text):
                    raise Unsupported("the script ends with a lone backslash")
                if text[self.pos + 1] != "\n":
                    literal.append(text[self.pos + 1])
                self.pos += 2
            elif char == "'":
                end = text.find("'", self.pos + 1)
                if end < 0:
                    raise Unsupported("a single quote is not closed")
                literal.append(text[self.pos + 1 : end])
                self.pos = end + 1
            elif char == '"':
                if self._double_quoted(literal) and prefix is None:
                    prefix = ["".join(literal).split("\0", 1)[0]]
            elif char in "$`":
                if prefix is None:
                    prefix = list(literal)
                self._expansion()
            else:
                if (char in _GLOB_CHARS or (char == "~" and self.pos == start)) and prefix is None:
                    prefix = list(literal)
                literal.append(char)
                self.pos += 1
        if self.redirect_target:
            self.redirect_target = False
            return
        value = "".join(literal)
        self.words.append(
            Word(
                start=start,
                end=self.pos,
                literal=value if prefix is None else None,
                prefix=value if prefix is None else "".join(prefix),
            )
        )

    def _double_quoted(self, literal: list[str]) -> bool:
        """Consume ``"..."``; append its literal text; return whether it held an expansion."""
        text = self.text
        self.pos += 1
        expanded = False
        while True:
            if self.pos >= len(text):
                raise Unsupported("a double quote is not closed")
            char = text[self.pos]
            if char == '"':
                self.pos += 1
                return expanded
            if char == "\\" and self.pos + 1 < len(text) and text[self.pos + 1] in '\\"$`\n':
                if text[self.pos + 1] != "\n":
                    literal.append(text[self.pos + 1])
                self.pos += 2
            elif char in "$`":
                if not expanded:
                    expanded = True
                    literal.append("\0")  # marks where the expansion began
                self._expansion()
            else:
                literal.append(char)
                self.pos += 1

    def _expansion(self) -> None:
        """Skip one expansion: ``$(...)``, ``${...}``, ``$name``, ``$'...'`` or backquotes."""
        text = self.text
        char = text[self.pos]
        if char == "`":
            end = self.pos + 1
            while end < len(text) and text[end] != "`":
                end += 2 if text[end] == "\\" else 1
            if end >= len(text):
                raise Unsupported("a backquote is not closed")
            self.pos = end + 1
            return
        nxt = text[self.pos + 1] if self.pos + 1 < len(text) else ""
        if nxt == "(":
            self.pos = _matching(text, self.pos + 1, "(", ")")
        elif nxt == "{":
            self.pos = _matching(text, self.pos + 1, "{", "}")
        elif nxt == "'":
            end = self.pos + 2
            while end < len(text) and text[end] != "'":
                end += 2 if text[end] == "\\" else 1
            if end >= len(text):
                raise Unsupported("a $'...' quote is not closed")
            self.pos = end + 1
        elif nxt.isalnum() or nxt == "_":
            end = self.pos + 1
            if nxt.isdigit():
                end += 1
            else:
                while end < len(text) and (text[end].isalnum() or text[end] == "_"):
                    end += 1
            self.pos = end
        elif nxt and nxt in "@*#?$!-":
            self.pos += 2
        else:
            self.pos += 1  # a lone ``$`` is literal to the shell, but we treat it as unknown


def _matching(text: str, pos: int, opening: str, closing: str) -> int:
    """The index after the ``closing`` that balances ``text[pos] == opening``, skipping quotes."""
    depth = 0
    while pos < len(text):
        char = text[pos]
        if char == "\\":
            pos += 2
            continue
        if char == "'":
            end = text.find("'", pos + 1)
            if end < 0:
                raise Unsupported("a single quote is not closed")
            pos = end + 1
            continue
        if char == '"':
            pos += 1
            while pos < len(text) and text[pos] != '"':
                pos += 2 if text[pos] == "\\" else 1
            if pos >= len(text):
                raise Unsupported("a double quote is not closed")
            pos += 1
            continue
        if char == opening:
            depth += 1
        elif char == closing:
            depth -= 1
            if depth == 0:
                return pos + 1
        pos += 1
    raise Unsupported(f"a {opening!r} is not closed")
