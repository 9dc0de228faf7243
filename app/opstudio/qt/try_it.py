""""Try it": a prompt, and the greedy text of the original and the optimized model side by side.

The texts come from ``core.generate.side_by_side`` run by the window in its worker; this panel
asks for the prompt and shows the result: each text with the part from the first differing
token on highlighted, where they part, and each model's time to first token and tokens/s."""

from __future__ import annotations

import html

from PySide6.QtCore import Signal
from PySide6.QtWidgets import (
    QCheckBox,
    QFileDialog,
    QGridLayout,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QPlainTextEdit,
    QPushButton,
    QSpinBox,
    QTextBrowser,
    QVBoxLayout,
    QWidget,
)

from opstudio.core.measure.generate import Generation, SideBySide
from opstudio.qt.theme import NOISE, SLOWER

DEFAULT_PROMPT = "The capital of France is"
_PARTED = "#fde2e0"  # the background of the text from the first differing token on


class TryItPanel(QWidget):
    generate_requested = Signal()

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.result: SideBySide | None = None
        self.prompt = QPlainTextEdit(DEFAULT_PROMPT)
        self.prompt.setMaximumHeight(70)
        self.prompt.setPlaceholderText("a prompt for the model to continue")
        self.max_tokens = QSpinBox()
        self.max_tokens.setRange(1, 2048)
        self.max_tokens.setValue(64)
        self.chat = QCheckBox("Chat template")
        self.chat.setToolTip("wrap the prompt in the tokenizer's chat template as the user's turn")
        self.tokenizer = QLineEdit()
        self.tokenizer.setPlaceholderText("tokenizer.json beside the model")
        browse = QPushButton("…")
        browse.setToolTip("choose a Hugging Face tokenizer.json")
        browse.clicked.connect(self._browse_tokenizer)
        self.generate_button = QPushButton("Generate")
        self.generate_button.clicked.connect(self.generate_requested)

        bar = QHBoxLayout()
        bar.addWidget(QLabel("Tokens"))
        bar.addWidget(self.max_tokens)
        bar.addWidget(self.chat)
        bar.addWidget(QLabel("Tokenizer"))
        bar.addWidget(self.tokenizer, 1)
        bar.addWidget(browse)
        bar.addWidget(self.generate_button)

        self.titles = [QLabel("<b>Original</b>"), QLabel("<b>Optimized</b>")]
        self.texts = [QTextBrowser(), QTextBrowser()]
        self.timings = [QLabel(), QLabel()]
        grid = QGridLayout()
        for col in range(2):
            grid.addWidget(self.titles[col], 0, col)
            grid.addWidget(self.texts[col], 1, col)
            grid.addWidget(self.timings[col], 2, col)
        self.summary = QLabel("Generate greedy text from the original model and, after "
                              "Optimize & compare, the optimized one.")
        self.summary.setWordWrap(True)

        layout = QVBoxLayout(self)
        layout.addWidget(self.prompt)
        layout.addLayout(bar)
        layout.addLayout(grid, 1)
        layout.addWidget(self.summary)

    def request(self) -> tuple[str, int, bool, str | None]:
        """The prompt, the most tokens, whether to use the chat template, the tokenizer named."""
        named = self.tokenizer.text().strip() or None
        return (self.prompt.toPlainText(), self.max_tokens.value(), self.chat.isChecked(), named)

    def set_running(self, running: bool) -> None:
        self.generate_button.setEnabled(not running)

    def show_result(self, result: SideBySide) -> None:
        self.result = result
        two = len(result.runs) == 2
        self.texts[1].setVisible(two)
        self.titles[1].setVisible(two)
        self.timings[1].setVisible(two)
        for k, run in enumerate(result.runs):
            self.texts[k].setHtml(self._html(result, run))
            self.timings[k].setText(_timing(run))
        if not two:
            self.summary.setText(f"{result.prompt_tokens} prompt tokens; run Optimize & "
                                 "compare to see the optimized model's text beside it.")
        elif result.diverges_at is None:
            self.summary.setText(f"The texts are the same ({len(result.runs[0].tokens)} "
                                 "tokens).")
        else:
            at = result.diverges_at
            words = result.parted()
            self.summary.setText(f"The texts part at generated token {at + 1} (highlighted): "
                                 f"{words[0]} vs {words[1]}.")

    def clear(self) -> None:
        self.result = None
        for k in range(2):
            self.texts[k].clear()
            self.timings[k].clear()

    @staticmethod
    def _html(result: SideBySide, run: Generation) -> str:
        mark = "\u0000"
        text = result.marked(run, mark) if result.diverges_at is not None else run.text
        head, _, tail = text.partition(mark)
        out = html.escape(head)
        if tail:
            out += (f'<span style="background:{_PARTED}; color:{SLOWER.name()}">'
                    f"{html.escape(tail)}</span>")
        if run.stopped_at_eos:
            out += f' <span style="color:{NOISE.name()}">[end of text]</span>'
        return f'<div style="white-space: pre-wrap">{out}</div>'

    def _browse_tokenizer(self) -> None:
        path, _ = QFileDialog.getOpenFileName(self, "Tokenizer", "",
                                              "Hugging Face tokenizer (tokenizer.json *.json)")
        if path:
            self.tokenizer.setText(path)


def _timing(run: Generation) -> str:
    rate = "-" if run.tokens_per_s is None else f"{run.tokens_per_s:.1f}"
    return (f"{len(run.tokens)} tokens · time to first token "
            f"{run.first_token_s * 1000:.1f} ms · {rate} tokens/s")

