"""The built-in prompt-injection rules, and the check of a user's pattern (imported by the
config section, so RE2 itself is imported only when a pattern is checked or used)."""

from __future__ import annotations

#: Built-in prompt-injection rules (RE2 syntax, matched case-insensitively on NFKC text).
INJECTION: dict[str, str] = {
    "injection_ignore_previous": (
        r"\b(?:ignore|disregard|forget|skip|override|bypass|drop)\s+(?:(?:all|any|every|the|"
        r"your|my|these|those|of|everything)\s+){0,3}(?:previous|prior|above|earlier|preceding|"
        r"foregoing|former|system|original|initial|old)\s+(?:instructions?|prompts?|rules?|"
        r"directions?|directives?|messages?|context|guidelines?|commands?|constraints?)"
    ),
    "injection_reveal_prompt": (
        r"\b(?:reveal|show|print|repeat|output|display|leak|tell\s+me|what\s+(?:is|are|was|were))"
        r"\s+(?:me\s+)?(?:your|the)\s+(?:(?:full|entire|exact|original|initial|hidden|secret)\s+)?"
        r"(?:system\s+(?:prompt|instructions?|message)|hidden\s+(?:prompt|instructions?)|"
        r"initial\s+(?:prompt|instructions?))"
    ),
    "injection_new_persona": (
        r"\b(?:you\s+are\s+now|from\s+now\s+on\s+you\s+are|act\s+as|pretend\s+(?:to\s+be|you\s+are))"
        r"\s+(?:an?\s+)?(?:DAN|unrestricted|unfiltered|uncensored|jailbroken|evil)\b"
        r"|\b(?:developer|god|jailbreak|DAN)\s+mode\b"
    ),
    "injection_role_marker": (
        r"<\|(?:im_start|im_end|im_sep|system|user|assistant|endoftext|eot_id|start_header_id|"
        r"end_header_id|begin_of_text|end_of_text)\|>|\[/?INST\]|<</?SYS>>|</?s>|"
        r"<(?:start|end)_of_turn>|(?m:^\s*#{1,6}\s*(?:system|instructions?|assistant)\s*:)"
    ),
    "injection_template": (
        r"\{%-?\s*(?:if|for|set|endif|endfor|raw|macro|include|import)\b|"
        r"\{\{-?\s*(?:messages|system|bos_token|eos_token|raise_exception)"
    ),
    "injection_ignore_previous_zh": (
        r"(?:忽略|无视|忘记|忘掉|不要理会|不用理会|不要管|跳过|绕过|覆盖)[^。！？\n]{0,12}"
        r"(?:之前|以前|上面|以上|上述|先前|前面|此前|原来|原先|原有|所有|全部|一切|系统)"
        r"[^。！？\n]{0,8}(?:指令|指示|说明|提示|规则|要求|设定|命令|限制|约束)"
    ),
    "injection_reveal_prompt_zh": (
        r"(?:告诉我|显示|输出|打印|重复|透露|泄露|泄漏|给我看)[^。！？\n]{0,8}"
        r"(?:系统提示|系统指令|初始指令|隐藏指令|提示词|系统设定)"
    ),
    "injection_new_persona_zh": (
        r"(?:你现在是|从现在开始你是|现在你是|扮演)[^。！？\n]{0,12}(?:没有|不受|无|解除)(?:任何)?"
        r"(?:限制|约束|规则|审查)|(?:开发者|越狱|上帝)模式"
    ),
}


def valid_pattern(pattern: str) -> None:
    """ValueError with RE2's reason when `pattern` does not compile."""
    import re2

    options = re2.Options()
    options.log_errors = False
    try:
        re2.compile(pattern, options)
    except re2.error as exc:
        reason = exc.args[0] if exc.args else exc
        if isinstance(reason, bytes):
            reason = reason.decode("utf-8", "replace")
        raise ValueError(f"not a valid RE2 pattern: {reason}") from None
