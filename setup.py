from setuptools import find_packages, setup

setup(
    name="ucp-plugin",
    version="0.1.0",
    description="Universal Checkpointing (arXiv 2406.18820) for DeepSpeed and Megatron-core: "
                "save on one parallel layout, resume on any other, with no offline conversion",
    # patches/ (upstream patches, one file per upstream function) ships inside the package as
    # ucp_plugin._patches, so installed copies find them too.
    packages=find_packages(include=["ucp_plugin", "ucp_plugin.*"]) + ["ucp_plugin._patches"],
    package_dir={"ucp_plugin._patches": "patches"},
    package_data={"ucp_plugin._patches": ["*.patch", "README.md"]},
    python_requires=">=3.10",
    # The ranges the plugin supports; CI pins torch 2.13.0 / deepspeed 0.19.8 / megatron-core 0.16.1.
    install_requires=[
        "torch>=2.4",
        "safetensors>=0.4",
        "packaging",
        "tqdm",
        "numpy",
    ],
    extras_require={
        "deepspeed": ["deepspeed>=0.16,<0.20"],
        "megatron": ["megatron-core>=0.12,<0.17"],
        "recipes": ["matplotlib"],
        "test": ["pytest", "hypothesis"],
        "hf": ["transformers>=5.0,<6", "accelerate>=1.0"],
    },
    entry_points={"console_scripts": ["ucp=ucp_plugin.cli.main:main"]},
)
