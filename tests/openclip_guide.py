"""The bash blocks of OpenCLIP's training guide (`openclip-training-guide.ko.md`, the guide our users follow),
verbatim, with the heading each sits under. ``tests/test_openclip_cli.py`` runs or translates every trainer command in
them, and checks (when the guide is next to the repository, in ``../shared/reference/``) that this copy is complete."""

from __future__ import annotations

import shlex
from dataclasses import dataclass

#: (heading, block text), in the guide's order
GUIDE_BLOCKS: list[tuple[str, str]] = [
    ("1. 가상환경 생성", "python3 -m venv .env\nsource .env/bin/activate\npip install -U pip\n"),
    (
        "2. 의존성 설치",
        "# 기본 훈련 의존성 설치\npip install 'open_clip_torch[training]'\n\n# 또는 개발용으로 소스에서 설치\ngit clone https://github.com/mlfoundations/open_clip.git\ncd open_clip\nmake install\nmake install-training\n",
    ),
    (
        "1. CSV 데이터셋 준비",
        '# CSV 파일 구조 예시\n# filepath\\ttitle\n# /path/to/image1.jpg\\t"A cat sitting on a chair"\n# /path/to/image2.jpg\\t"A dog playing in the park"\n',
    ),
    (
        "2. WebDataset 준비",
        "# tar 파일 구조\n# dataset_000.tar\n#   ├── sample_001.jpg\n#   ├── sample_001.txt\n#   ├── sample_002.jpg\n#   └── sample_002.txt\n",
    ),
    (
        "최소 설정으로 훈련 시작",
        'python -m open_clip_train.main \\\n    --train-data="/path/to/train_data.csv" \\\n    --val-data="/path/to/validation_data.csv" \\\n    --csv-img-key filepath \\\n    --csv-caption-key title \\\n    --model ViT-B-32 \\\n    --batch-size 64 \\\n    --lr 1e-3 \\\n    --epochs 10 \\\n    --workers 4 \\\n    --logs ./logs/\n',
    ),
    (
        "1. 모델 선택",
        "# Vision Transformer 모델들\n--model ViT-B-32      # ViT-Base/32\n--model ViT-B-16      # ViT-Base/16\n--model ViT-L-14      # ViT-Large/14\n\n# ResNet 모델들\n--model RN50          # ResNet-50\n--model RN101         # ResNet-101\n\n# ConvNext 모델들\n--model convnext_base # ConvNext-Base\n",
    ),
    (
        "2. 사전훈련된 모델에서 시작",
        'python -m open_clip_train.main \\\n    --model ViT-B-32 \\\n    --pretrained laion2b_s34b_b79k \\\n    --train-data="/path/to/data.csv" \\\n    --lr 1e-4 \\\n    --epochs 5\n',
    ),
    (
        "3. 이미지 및 텍스트 타워 고정",
        "# 이미지 인코더 일부 고정 (마지막 n개 레이어만 학습)\n--lock-image \\\n--lock-image-unlocked-groups 2\n\n# 텍스트 인코더 일부 고정 (마지막 n개 레이어만 학습)  \n--lock-text \\\n--lock-text-unlocked-layers 2\n",
    ),
    (
        "4. 데이터 증강 설정",
        "--aug-cfg scale='(0.9, 1.0)' \\\n--aug-cfg color_jitter='(0.4, 0.4, 0.4, 0.1)' \\\n--aug-cfg color_jitter_prob=0.8 \\\n--aug-cfg gray_scale_prob=0.2\n",
    ),
    (
        "1. 단일 노드 멀티 GPU",
        "# 4개 GPU 사용\ncd src\ntorchrun --nproc_per_node 4 -m open_clip_train.main \\\n    --train-data '/path/to/dataset.tar' \\\n    --dataset-type webdataset \\\n    --batch-size 320 \\\n    --precision amp \\\n    --workers 4 \\\n    --model ViT-B-32\n",
    ),
    (
        "2. 멀티 노드 훈련",
        "# 마스터 노드에서\ntorchrun --nproc_per_node=8 \\\n    --nnodes=4 \\\n    --node_rank=0 \\\n    --master_addr=\"192.168.1.1\" \\\n    --master_port=12355 \\\n    -m open_clip_train.main \\\n    --train-data '/path/to/dataset.tar' \\\n    --dataset-type webdataset \\\n    --batch-size 256 \\\n    --model ViT-B-32\n",
    ),
    (
        "3. SLURM 클러스터에서 훈련",
        '#!/bin/bash\n#SBATCH --nodes=8\n#SBATCH --gres=gpu:4\n#SBATCH --ntasks-per-node=4\n#SBATCH --cpus-per-task=6\n\neval "$(/path/to/conda/bin/conda shell.bash hook)"\nconda activate open_clip\n\nexport CUDA_VISIBLE_DEVICES=0,1,2,3\nexport MASTER_PORT=12802\n\nmaster_addr=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)\nexport MASTER_ADDR=$master_addr\n\ncd /path/to/open_clip\nexport PYTHONPATH="$PYTHONPATH:$PWD/src"\n\nsrun python -u src/open_clip_train/main.py \\\n    --save-frequency 1 \\\n    --train-data="/data/dataset/{00000..99999}.tar" \\\n    --dataset-type webdataset \\\n    --warmup 2000 \\\n    --batch-size=256 \\\n    --epochs=32 \\\n    --workers=8 \\\n    --model ViT-B-32 \\\n    --precision amp \\\n    --local-loss \\\n    --gather-with-grad\n',
    ),
    (
        "1. TensorBoard 로깅",
        'python -m open_clip_train.main \\\n    --report-to tensorboard \\\n    --logs ./logs/ \\\n    --train-data="/path/to/data.csv"\n\n# 별도 터미널에서 TensorBoard 실행\ntensorboard --logdir=logs/tensorboard/ --port=7777\n',
    ),
    (
        "2. Weights & Biases 로깅",
        'python -m open_clip_train.main \\\n    --report-to wandb \\\n    --wandb-project-name "my-clip-training" \\\n    --wandb-notes "Initial CLIP training experiment" \\\n    --train-data="/path/to/data.csv"\n',
    ),
    ("3. 둘 다 사용", "--report-to wandb,tensorboard\n"),
    (
        "1. 체크포인트 저장 설정",
        'python -m open_clip_train.main \\\n    --save-frequency 2 \\         # 2 에포크마다 저장\n    --save-most-recent \\         # 최신 체크포인트 항상 저장\n    --delete-previous-checkpoint \\ # 이전 체크포인트 삭제\n    --train-data="/path/to/data.csv"\n',
    ),
    (
        "2. 훈련 재시작",
        'python -m open_clip_train.main \\\n    --resume /path/to/checkpoints/epoch_10.pt \\\n    --train-data="/path/to/data.csv"\n\n# 또는 최신 체크포인트에서 자동 재시작\npython -m open_clip_train.main \\\n    --resume latest \\\n    --train-data="/path/to/data.csv"\n',
    ),
    (
        "3. 원격 저장소 동기화",
        'python -m open_clip_train.main \\\n    --remote-sync s3://my-bucket/checkpoints \\\n    --remote-sync-frequency 300 \\  # 5분마다 동기화\n    --train-data="/path/to/data.csv"\n',
    ),
    (
        "1. 메모리 최적화",
        'python -m open_clip_train.main \\\n    --precision amp \\              # 자동 혼합 정밀도\n    --grad-checkpointing \\         # 그래디언트 체크포인팅\n    --local-loss \\                 # 로컬 손실 계산\n    --gather-with-grad \\           # 그래디언트와 함께 수집\n    --train-data="/path/to/data.csv"\n',
    ),
    (
        "2. 대용량 배치 시뮬레이션",
        'python -m open_clip_train.main \\\n    --batch-size 64 \\\n    --accum-freq 4 \\              # 4번 누적하여 배치크기 256 효과\n    --train-data="/path/to/data.csv"\n',
    ),
    (
        "3. 패치 드롭아웃 (훈련 가속화)",
        'python -m open_clip_train.main \\\n    --force-patch-dropout 0.5 \\   # 50% 패치 드롭아웃\n    --model ViT-B-16 \\\n    --train-data="/path/to/data.csv"\n',
    ),
    (
        "4. 모델 컴파일 (PyTorch 2.0+)",
        'python -m open_clip_train.main \\\n    --torchcompile \\\n    --train-data="/path/to/data.csv"\n',
    ),
    (
        "1. ImageNet 제로샷 평가",
        'python -m open_clip_train.main \\\n    --imagenet-val /path/to/imagenet/val \\\n    --zeroshot-frequency 2 \\      # 2 에포크마다 평가\n    --train-data="/path/to/data.csv"\n',
    ),
    (
        "2. 훈련 없이 평가만 수행",
        "python -m open_clip_train.main \\\n    --imagenet-val /path/to/imagenet/val \\\n    --model ViT-B-32 \\\n    --pretrained laion2b_s34b_b79k\n",
    ),
    (
        "1. CoCa 모델 훈련",
        'python -m open_clip_train.main \\\n    --model coca_ViT-B-32 \\\n    --coca-contrastive-loss-weight 1.0 \\\n    --coca-caption-loss-weight 2.0 \\\n    --train-data="/path/to/data.csv"\n',
    ),
    (
        "2. SigLIP 손실 함수 사용",
        'python -m open_clip_train.main \\\n    --siglip \\\n    --model ViT-B-32 \\\n    --train-data="/path/to/data.csv"\n',
    ),
    (
        "3. 지식 증류",
        'python -m open_clip_train.main \\\n    --model ViT-B-32 \\\n    --distill-model ViT-L-14 \\\n    --distill-pretrained openai \\\n    --train-data="/path/to/data.csv"\n',
    ),
    (
        "1. 소규모 실험용 설정",
        'python -m open_clip_train.main \\\n    --train-data="./data/small_dataset.csv" \\\n    --val-data="./data/validation.csv" \\\n    --csv-img-key filepath \\\n    --csv-caption-key caption \\\n    --model ViT-B-32 \\\n    --batch-size 32 \\\n    --lr 1e-3 \\\n    --epochs 5 \\\n    --workers 2 \\\n    --precision amp \\\n    --report-to tensorboard \\\n    --logs ./logs/small_exp\n',
    ),
    (
        "2. 대규모 데이터셋 훈련",
        'torchrun --nproc_per_node 8 -m open_clip_train.main \\\n    --train-data="/data/laion400m/{00000..41455}.tar" \\\n    --dataset-type webdataset \\\n    --train-num-samples 400000000 \\\n    --val-data="/data/validation/{00000..00099}.tar" \\\n    --val-num-samples 10000 \\\n    --model ViT-B-16 \\\n    --batch-size 128 \\\n    --lr 5e-4 \\\n    --beta1 0.9 \\\n    --beta2 0.98 \\\n    --eps 1e-6 \\\n    --wd 0.2 \\\n    --warmup 10000 \\\n    --epochs 32 \\\n    --workers 6 \\\n    --precision amp \\\n    --grad-checkpointing \\\n    --local-loss \\\n    --gather-with-grad \\\n    --save-frequency 1 \\\n    --save-most-recent \\\n    --delete-previous-checkpoint \\\n    --zeroshot-frequency 1 \\\n    --imagenet-val /data/imagenet/val \\\n    --report-to wandb \\\n    --wandb-project-name "laion400m-vitb16" \\\n    --remote-sync s3://my-bucket/checkpoints \\\n    --logs ./logs/laion400m_training\n',
    ),
    (
        "3. 파인튜닝 예제",
        'python -m open_clip_train.main \\\n    --train-data="./data/domain_specific.csv" \\\n    --model ViT-B-32 \\\n    --pretrained laion2b_s34b_b79k \\\n    --lr 1e-5 \\                    # 낮은 학습률\n    --epochs 3 \\                   # 짧은 에포크\n    --batch-size 64 \\\n    --warmup 500 \\\n    --lock-image \\                 # 이미지 인코더 고정\n    --lock-image-unlocked-groups 1 \\ # 마지막 1개 그룹만 학습\n    --precision amp \\\n    --report-to tensorboard\n',
    ),
    (
        "1. 메모리 부족 오류",
        "# 배치 크기 줄이기\n--batch-size 32\n\n# 그래디언트 체크포인팅 활성화\n--grad-checkpointing\n\n# 로컬 손실 사용\n--local-loss --gather-with-grad\n\n# 정밀도 변경\n--precision fp16\n",
    ),
    (
        "2. 학습 속도가 느림",
        "# 워커 수 증가\n--workers 8\n\n# 배치 크기 증가 (GPU 메모리가 허용하는 경우)\n--batch-size 128\n\n# 패치 드롭아웃 사용 (ViT 모델의 경우)\n--force-patch-dropout 0.5\n\n# 모델 컴파일 사용\n--torchcompile\n",
    ),
    (
        "3. 분산 훈련 문제",
        "# 네트워크 백엔드 변경\n--dist-backend nccl\n\n# 포트 변경\nexport MASTER_PORT=12355\n\n# 정적 그래프 최적화\n--ddp-static-graph\n",
    ),
    (
        "4. 데이터 로딩 오류",
        '# CSV 구분자 확인\n--csv-separator "\\t"\n\n# 이미지/캡션 키 확인\n--csv-img-key image_path\n--csv-caption-key text\n\n# WebDataset 샘플 수 명시적 지정\n--train-num-samples 1000000\n',
    ),
    ("유용한 팁", '   --name "experiment_$(date +%Y%m%d_%H%M%S)"\n   '),
    ("유용한 팁", "   --debug --batch-size 4 --epochs 1\n   "),
    ("유용한 팁", "   python -c \"import torch; print(torch.load('epoch_10.pt').keys())\"\n   "),
    ("유용한 팁", "   nvidia-smi -l 1\n   "),
]


def _strip_comment(line: str) -> str:
    """``line`` without a shell comment (a ``#`` that starts a word, outside quotes)."""
    quote = None
    for index, char in enumerate(line):
        if quote:
            quote = None if char == quote else quote
        elif char in "'\"":
            quote = char
        elif char == "#" and (index == 0 or line[index - 1].isspace()):
            return line[:index].rstrip()
    return line.rstrip()


def logical_lines(block: str) -> list[str]:
    """The block's commands: comments dropped, backslash continuations joined."""
    lines, current = [], ""
    for raw in block.splitlines():
        line = _strip_comment(raw)
        continued = line.endswith("\\")
        current += " " + line.removesuffix("\\").strip()
        if not continued and current.strip():
            lines.append(current.strip())
            current = ""
        elif not continued:
            current = ""
    return lines


@dataclass(frozen=True)
class GuideCommand:
    """One trainer command of the guide: ``launcher`` (``python -m``, ``torchrun ... -m``, ``srun python -u``; empty for
    a fragment of flags) and the OpenCLIP ``flags``."""

    block: int
    number: int  # among the block's trainer commands
    heading: str
    launcher: tuple[str, ...]
    flags: tuple[str, ...]

    @property
    def id(self) -> str:
        return f"{self.block}.{self.number}"


def guide_commands() -> list[GuideCommand]:
    """Every open_clip_train command and flag fragment of the guide, in order."""
    commands = []
    for block, (heading, text) in enumerate(GUIDE_BLOCKS):
        number = 0
        for line in logical_lines(text):
            words = shlex.split(line)
            at = next((i for i, w in enumerate(words) if "open_clip_train" in w), None)
            if at is not None:
                launcher, flags = tuple(words[:at]), tuple(words[at + 1 :])
            elif words[0].startswith("--"):
                launcher, flags = (), tuple(words)
            else:
                continue  # pip, cd, export, tensorboard, nvidia-smi, ...: not the trainer
            commands.append(GuideCommand(block, number, heading, launcher, flags))
            number += 1
    return commands


def other_lines() -> list[tuple[int, str]]:
    """The guide's command lines that do not run the trainer (setup, shell, monitoring)."""
    found = []
    for block, (_, text) in enumerate(GUIDE_BLOCKS):
        for line in logical_lines(text):
            if "open_clip_train" not in line and not line.startswith("--"):
                found.append((block, line))
    return found
