"""Greedy generation through vLLM's offline engine, in its own process: requests in, prompt and answer ids out.

    python -m tests.serving.vllm_greedy MODEL_DIR REQUESTS_JSON OUTPUT_JSON

REQUESTS_JSON lists {"prompt": str, "images": [PNG paths], "max_tokens": int}; OUTPUT_JSON gets, per request,
{"prompt_token_ids": [...], "token_ids": [...], "logprobs": [...], "text": str}: the log-probability of each
generated token.
"""

import json
import sys

from PIL import Image


def main(model_dir: str, requests_path: str, output_path: str):
    from vllm import LLM, SamplingParams

    with open(requests_path) as file:
        requests = json.load(file)
    max_images = max(len(request["images"]) for request in requests)
    llm = LLM(
        model=model_dir,
        dtype="float32",
        max_model_len=512,
        limit_mm_per_prompt={"image": max_images},
        enforce_eager=True,
        seed=0,
    )
    prompts = [
        {"prompt": request["prompt"], "multi_modal_data": {"image": [Image.open(path) for path in request["images"]]}}
        for request in requests
    ]
    params = [SamplingParams(temperature=0.0, max_tokens=request["max_tokens"], logprobs=0) for request in requests]
    outputs = llm.generate(prompts, params)
    results = [
        {
            "prompt_token_ids": list(output.prompt_token_ids),
            "token_ids": list(output.outputs[0].token_ids),
            "logprobs": [
                step[token].logprob for step, token in zip(output.outputs[0].logprobs, output.outputs[0].token_ids)
            ],
            "text": output.outputs[0].text,
        }
        for output in outputs
    ]
    with open(output_path, "w") as file:
        json.dump(results, file)


if __name__ == "__main__":
    main(*sys.argv[1:])
