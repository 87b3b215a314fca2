"""Gemini as a captioning baseline, through the official ``google-genai`` client (the ``gemini`` extra).

The API key comes from ``GEMINI_API_KEY`` or ``GOOGLE_API_KEY`` (or ``api_key=``) and is never printed, logged
or stored: error messages are scrubbed of it before they reach :attr:`GeminiCaptioner.failures`. Rate limits
(429), timeouts and server errors are retried with exponential backoff; any other error, an empty answer, or an
image that cannot be decoded fails that image only. A failed image gets an empty caption, so outputs stay
aligned with the inputs, and one entry in ``failures``: it is reported, never silently dropped.
"""

from __future__ import annotations

import io
import os
import random
import time
from collections.abc import Callable, Sequence
from typing import Any

from medblip_peft.data.images import BadImageError, load_image

__all__ = ["DEFAULT_GEMINI_PROMPT", "RETRYABLE_STATUS", "GeminiCaptioner", "api_key_from_env"]

#: The request sent with each image; the study's Gemini prompt is not published, so this one is explicit.
DEFAULT_GEMINI_PROMPT = (
    "You are a radiologist. Write a one-sentence caption for this medical image, as in a journal figure "
    "legend: name the modality, the body region and the main finding. Reply with the caption only."
)
#: HTTP statuses worth another attempt: timeout, rate limit, and transient server errors.
RETRYABLE_STATUS = frozenset({408, 429, 500, 502, 503, 504})
_KEY_VARIABLES = ("GEMINI_API_KEY", "GOOGLE_API_KEY")


def api_key_from_env() -> str:
    """The first of ``GEMINI_API_KEY``/``GOOGLE_API_KEY`` that is set; the error names them, never a value."""
    for var in _KEY_VARIABLES:
        if os.environ.get(var):
            return os.environ[var]
    raise OSError(f"No Gemini API key: set {' or '.join(_KEY_VARIABLES)} in the environment.")


class GeminiCaptioner:
    """Caption images with a Gemini model; study settings by default (temperature 0.4, top-p 0.9).

    Args:
        model: Model name, e.g. ``"gemini-1.5-flash"`` (the study) or a newer one.
        name: The captioner's name in tables.
        prompt: Text sent with each image.
        temperature, top_p, max_output_tokens: Sampling settings.
        api_key: Key to use instead of the environment (kept in the client only, never in messages).
        base_url: Another endpoint (a proxy, or a loopback server in tests).
        max_attempts: Attempts per image, the first included.
        initial_delay, max_delay: Backoff: ``initial_delay * 2**k`` seconds (with up to 10% jitter), capped.
        timeout_s: Per-request timeout.
        sleep: Replaces ``time.sleep`` (tests).

    Attributes:
        failures: One dict per failed image of the latest call: ``index``, ``image`` (its label when it is a
            path), ``error`` (class), ``status`` (HTTP code or ``None``), ``message`` (scrubbed), ``attempts``.
    """

    def __init__(
        self,
        model: str = "gemini-1.5-flash",
        *,
        name: str = "gemini",
        prompt: str = DEFAULT_GEMINI_PROMPT,
        temperature: float = 0.4,
        top_p: float = 0.9,
        max_output_tokens: int = 128,
        api_key: str | None = None,
        base_url: str | None = None,
        max_attempts: int = 6,
        initial_delay: float = 2.0,
        max_delay: float = 60.0,
        timeout_s: float = 60.0,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        try:
            from google import genai
            from google.genai import types
        except ImportError as err:
            raise ImportError('The Gemini baseline needs google-genai: pip install "medblip-peft[gemini]"') from err
        self.name = name
        self.model = model
        self.prompt = prompt
        self.max_attempts = max(1, max_attempts)
        self.initial_delay, self.max_delay = initial_delay, max_delay
        self.sleep = sleep
        self.failures: list[dict[str, Any]] = []
        self._types = types
        self._config = types.GenerateContentConfig(
            temperature=temperature, top_p=top_p, max_output_tokens=max_output_tokens
        )
        key = api_key or api_key_from_env()
        self._scrub_value = key  # only used to erase the key from error texts
        # The client's own retries are off (attempts=1): retrying here lets us count attempts per image and
        # report the last error of an image that never succeeded.
        http = types.HttpOptions(
            base_url=base_url,
            timeout=int(timeout_s * 1000),
            retry_options=types.HttpRetryOptions(attempts=1),
        )
        self._client = genai.Client(api_key=key, http_options=http)

    def __repr__(self) -> str:  # no key, ever
        return f"GeminiCaptioner(model={self.model!r}, name={self.name!r})"

    def _scrub(self, text: str) -> str:
        return text.replace(self._scrub_value, "***") if self._scrub_value else text

    def _part(self, image: Any) -> Any:
        buffer = io.BytesIO()
        load_image(image).save(buffer, format="PNG")  # lossless: JPEG artefacts would be a confound
        return self._types.Part.from_bytes(data=buffer.getvalue(), mime_type="image/png")

    def _backoff(self, attempt: int) -> float:
        delay = min(self.max_delay, self.initial_delay * 2**attempt)
        return delay * (1 + 0.1 * random.random())  # jitter keeps parallel clients from retrying in step

    def caption_one(self, image: Any, **overrides: Any) -> tuple[str | None, dict[str, Any] | None]:
        """``(caption, None)`` on success, ``(None, failure)`` otherwise, after retries where they help."""
        from google.genai import errors

        try:
            contents = [self._part(image), self.prompt]
        except BadImageError as err:
            return None, {"error": type(err).__name__, "status": None, "message": str(err), "attempts": 0}
        config = self._config.model_copy(update=overrides) if overrides else self._config
        failure: dict[str, Any] = {}
        for attempt in range(1, self.max_attempts + 1):
            status: int | None = None
            try:
                response = self._client.models.generate_content(model=self.model, contents=contents, config=config)
                text = (response.text or "").strip()
                if text:
                    return " ".join(text.split()), None
                # No text: blocked by a safety filter, or the token budget ran out; a retry would do the same.
                reason = response.candidates[0].finish_reason if response.candidates else "no candidates"
                return None, {"error": "EmptyResponse", "status": None, "message": f"finish_reason={reason}",
                              "attempts": attempt}
            except errors.APIError as err:
                status, retry = err.code, err.code in RETRYABLE_STATUS
                failure = {"error": type(err).__name__, "status": status, "message": self._scrub(str(err))}
            except Exception as err:
                # Connection resets and timeouts are worth a retry: OSError, or the HTTP library's transport
                # errors (httpx's do not derive from OSError). Anything else fails this image only.
                retry = isinstance(err, OSError) or type(err).__module__.startswith(("httpx", "httpcore"))
                failure = {"error": type(err).__name__, "status": None, "message": self._scrub(str(err))}
            failure["attempts"] = attempt
            if not retry or attempt == self.max_attempts:
                break
            self.sleep(self._backoff(attempt - 1))
        return None, failure

    def __call__(self, images: Sequence[Any], **overrides: Any) -> list[str]:
        """One caption per image, ``""`` for failed ones (listed in :attr:`failures`).

        Only Gemini's own settings are honoured as overrides (``temperature``, ``top_p``, ``max_output_tokens``);
        Hugging Face generation settings such as ``num_beams`` are ignored.
        """
        allowed = {k: v for k, v in overrides.items() if k in ("temperature", "top_p", "max_output_tokens")}
        self.failures = []
        captions = []
        for index, image in enumerate(images):
            caption, failure = self.caption_one(image, **allowed)
            if failure is not None:
                label = image if isinstance(image, str) else getattr(image, "filename", None) or None
                self.failures.append({"index": index, "image": label, **failure})
            captions.append(caption or "")
        return captions
