"""A terminal chat through the pipeline: rank 0 reads the user's lines, the reply streams as it is
generated, and the KV cache is kept across turns, so a turn only prefills its own new text.

    python chat.py --ckpt_dir ckpts/stories260K_pp2 [--prompt runs/alpaca/prompt]
    torchrun --nproc_per_node 2 chat.py --ckpt_dir ckpts/stories260K_pp2
"""
import queue
import signal
import sys
import threading
from dataclasses import dataclass

from llama.errors import BadInput
from llama.serving.conversation import user_turn_ids
from llama.serving.detokenize import Detokenizer
from llama.serving.engine import STAGE_TUNING, Engine
from llama.serving.sampling import Sampling

HINT = "(/reset clears the history; /exit or Ctrl+D quits; Ctrl+C stops a reply)"


@dataclass
class Turn:
    text: str
    user_ids: list
    reply_ids: list


class Conversation:
    """The history as ids (BOS, then each turn) and how much of it is cached. max_seq_len: the
    positions left to text (a soft prompt's or prefix's virtual tokens already taken off)."""

    def __init__(self, tokenizer, template: str, max_seq_len: int, max_gen_len: int):
        self.tokenizer, self.template = tokenizer, template
        self.head = [tokenizer.bos_id]
        self.max_seq_len, self.max_gen_len = max_seq_len, max_gen_len
        self.turns, self.cached = [], 0  # the ids at positions < cached are in the KV cache

    def ids(self) -> list:
        out = list(self.head)
        for turn in self.turns:
            out += turn.user_ids + turn.reply_ids
        return out

    def reset(self):
        self.turns, self.cached = [], 0

    def make_room(self, text: str):
        """The new turn's ids after dropping the oldest turns until it and a full reply fit;
        (ids, number of turns dropped), or (None, 0) when the turn alone does not fit."""
        alone = user_turn_ids(self.tokenizer, text, self.template, first=True)
        if len(self.head) + len(alone) + self.max_gen_len > self.max_seq_len:
            return None, 0
        dropped = 0
        while True:
            user = user_turn_ids(self.tokenizer, text, self.template, first=not self.turns)
            if len(self.ids()) + len(user) + self.max_gen_len <= self.max_seq_len:
                break
            self.turns.pop(0)
            dropped += 1
            if self.turns:  # the new first turn has no reply before it
                first = self.turns[0]
                first.user_ids = user_turn_ids(self.tokenizer, first.text, self.template, True)
        if dropped:
            self.cached = 0  # every position moved: the cache is recomputed from the start
        return user, dropped


class Terminal:
    """Lines from stdin (read by a thread, so rank 0 can keep the other ranks informed while the
    user types) and Ctrl+C as a flag, so it never interrupts a step halfway."""

    def __init__(self, stdin, stdout):
        self.stdout = stdout
        self.lines = queue.Queue()
        self.interrupted = threading.Event()
        threading.Thread(target=self._read, args=(stdin,), daemon=True).start()

    def _read(self, stdin):
        # Bytes decoded here, not by the text stream: a line that is not UTF-8 then reaches the
        # chat (which refuses it) with its bad bytes as surrogates, instead of a UnicodeDecodeError
        # that would end this thread and the conversation with it.
        binary = getattr(stdin, "buffer", None)
        lines = iter(binary.readline, b"") if binary else iter(stdin.readline, "")
        for line in lines:
            if isinstance(line, bytes):
                line = line.decode(stdin.encoding or "utf-8", errors="surrogateescape")
            self.lines.put(line.rstrip("\r\n"))
        self.lines.put(None)  # Ctrl+D / end of input

    def write(self, text: str):
        self.stdout.write(text)
        self.stdout.flush()

    def read_line(self, wait_s: float, on_wait):
        """The user's next line (None at end of input); on_wait() runs every wait_s meanwhile."""
        self.write("Human: ")
        while True:
            try:
                return self.lines.get(timeout=wait_s)
            except queue.Empty:
                on_wait()
            if self.interrupted.is_set():  # Ctrl+C between replies stops nothing
                self.interrupted.clear()
                self.write(f"\n{HINT}\nHuman: ")


class Chat:
    """The reply loop on rank 0; each turn is steps of the engine's one row (llama/serving/engine.py):
    the row joins afresh when nothing is cached, else the turn's new ids extend it."""

    def __init__(self, engine: Engine, tuning, sampling: Sampling, conversation: Conversation,
                 terminal: Terminal, stop_ids, heartbeat_s: float):
        self.engine, self.tuning, self.sampling = engine, tuning, sampling
        self.conversation, self.terminal = conversation, terminal
        self.stop_ids, self.heartbeat_s = stop_ids, heartbeat_s

    def idle(self):
        self.engine.ctx.broadcast_object({"op": "idle"})

    def feed(self, chunk: list) -> int:
        """The id after the history's uncached ids (chunk); the whole history when none is."""
        if self.conversation.cached == 0:
            join = {"ids": chunk, "tuning": self.tuning, "sampling": vars(self.sampling)}
            plan = {"op": "step", "keep": [] if self.engine.rows else None, "join": [join]}
        else:
            plan = {"op": "step", "extend": [(0, chunk)]}
        return self.engine.do(plan)["prefilled"][0]

    def next_id(self) -> int:
        """The id after the one picked last (fed at the next position)."""
        return self.engine.do({"op": "step", "decode": True})["decoded"][0]

    def run(self):
        while True:
            line = self.terminal.read_line(self.heartbeat_s, self.idle)
            if line is None or line.strip() == "/exit":
                if line is None:
                    self.terminal.write("\n")
                return
            if line.strip() == "/reset":
                self.conversation.reset()
                self.terminal.write("(history cleared)\n")
            elif line.strip():
                self.reply(line)

    def reply(self, text: str) -> list:
        """Stream the reply to text; returns its ids (also kept in the history)."""
        conversation, write = self.conversation, self.terminal.write
        try:
            user, dropped = conversation.make_room(text)
        except BadInput as error:  # text the tokenizer cannot read: the chat goes on
            write(f"({error})\n")
            return []
        if user is None:
            write(f"(that message does not fit max_seq_len={conversation.max_seq_len} with a "
                  f"reply of --max_gen_len={conversation.max_gen_len} tokens: say it shorter)\n")
            return []
        if dropped:
            write(f"(the history outgrew max_seq_len={conversation.max_seq_len}: dropped the "
                  f"oldest {dropped} turn{'s' if dropped > 1 else ''})\n")
        turn = Turn(text, user, [])
        conversation.turns.append(turn)
        self.stream(turn, conversation.ids()[conversation.cached:])
        return turn.reply_ids

    def stream(self, turn: Turn, chunk: list):
        """Generate the turn's reply after the history's uncached ids (chunk), writing its text
        as it comes (incrementally decoded: llama/serving/detokenize.py)."""
        conversation, write = self.conversation, self.terminal.write
        detokenizer = Detokenizer(conversation.tokenizer, turn.user_ids)
        self.terminal.interrupted.clear()
        write("Assistant: ")
        token = self.feed(chunk)
        conversation.cached += len(chunk)
        stopped = False
        while token not in self.stop_ids:
            turn.reply_ids.append(token)
            write(detokenizer.add(token))
            stopped = self.terminal.interrupted.is_set()
            if stopped or len(turn.reply_ids) >= conversation.max_gen_len:
                break
            token = self.next_id()
            conversation.cached += 1
        write(detokenizer.finish(turn.reply_ids))
        if stopped:
            self.terminal.interrupted.clear()
            write(" [stopped]")
        write("\n")


def run_chat(stage, tokenizer, template: str, max_gen_len: int, sampling: Sampling,
             heartbeat_s: float, stdin=None, stdout=None, banner: str = "",
             use_tuning: bool = True):
    """Rank 0 chats on stdin/stdout and returns the Conversation; the other ranks follow it
    until it quits. use_tuning: with the Stage's tuning (prompt, prefix or adapter)."""
    engine = Engine(stage, max_rows=1)
    try:
        if stage.ctx.rank != 0:  # rank 0 decides the steps
            engine.follow()
            return None
        tuning = STAGE_TUNING if use_tuning else None
        conversation = Conversation(tokenizer, template,
                                    stage.max_seq_len - engine.n_virtual(tuning), max_gen_len)
        terminal = Terminal(stdin or sys.stdin, stdout or sys.stdout)
        previous = signal.signal(signal.SIGINT, lambda *_: terminal.interrupted.set())
        try:
            terminal.write(f"{banner}\n{HINT}\n" if banner else f"{HINT}\n")
            Chat(engine, tuning, sampling, conversation, terminal, tokenizer.stop_ids,
                 heartbeat_s).run()
            engine.ctx.broadcast_object({"op": "quit"})
        finally:
            signal.signal(signal.SIGINT, previous)
        return conversation
    finally:
        engine.close()
