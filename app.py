"""VL2 Grounding Studio — entry point (also the Hugging Face Space's app_file).

python app.py                      # deepseek-ai/deepseek-vl2-tiny on this machine
python app.py --model /path/ckpt   # a local checkpoint folder
python app.py --help
"""

from app.launch import main

if __name__ == "__main__":
    raise SystemExit(main())
