"""Study pipelines: whole experiments on image data that train their own MoE teachers, used by the main job
(`demo`), the example scripts and the benchmarks: OneS (`ones`), m2mKD (`m2mkd`) and what they share (`vision`)."""
