# CPU image of the demo: python app.py on port 7860, as a non-root user (Hugging Face Spaces layout).
FROM python:3.11-slim

RUN useradd --create-home --uid 1000 user
WORKDIR /home/user/app

# CPU-only torch keeps the image small; the rest comes from requirements.txt.
COPY --chown=user requirements.txt .
RUN pip install --no-cache-dir --index-url https://download.pytorch.org/whl/cpu torch==2.14.1 torchvision==0.29.1 \
 && pip install --no-cache-dir -r requirements.txt

COPY --chown=user app.py ./
COPY --chown=user cxr_demo ./cxr_demo
COPY --chown=user checkpoints ./checkpoints
COPY --chown=user examples ./examples

USER user
ENV GRADIO_SERVER_NAME=0.0.0.0 \
    MALLOC_ARENA_MAX=2 \
    GRADIO_SERVER_PORT=7860 \
    GRADIO_ANALYTICS_ENABLED=False \
    HOME=/home/user
EXPOSE 7860
CMD ["python", "app.py"]
