"""Conversation-producing tasks for SFT, RL and evaluation (nanochat's `tasks/`, re-written).

A Task is a sliceable list of conversations in the chat format of flaxchat/chat_format.py, with an
optional grader (`evaluate` / `reward`). Modules, imported lazily so that `import flaxchat.tasks`
stays cheap and never touches the network:
  base        Task, TaskMixture, TaskError
  hf          parquet download of Hugging Face datasets (no `datasets` dependency)
  gsm8k       GSM8K (+ gsm8k_conversation, extract_answer)    mmlu / arc  multiple choice
  smoltalk    SmolTalk chat                                   humaneval_task  HumanEval in the sandbox
  spelling    SpellingBee, SimpleSpelling                     user_jsonl  a user's JSONL conversations
  demo        DemoChat, DemoMath (offline demo preset)        mixtures    what each stage trains on
"""

from flaxchat.tasks.base import Task, TaskError, TaskMixture

__all__ = ["Task", "TaskError", "TaskMixture"]
